"""The ``torch`` backend: fastvq.reference, which runs on any device and dtype.

Its float32 nearest_code and nearest_codes keep the other backends' supported range (fastvq.numerics.search_range_error):
beyond it a float32 distance overflows and every code would tie at +inf, so they raise the same
ValueError instead of returning index 0. float64 inputs are searched in float64 and have no such limit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .base import Backend
from .search_range import raise_if_out_of_range, range_check


class TorchBackend(Backend):
    name = "torch"

    def unavailable_reason(self) -> str | None:
        return None

    def not_supported_reasons(self, *tensors: Tensor) -> list[str]:
        return []

    def nearest_code(self, x, codebook, want_quantized, hint=None):
        _check_float32_range(x, codebook)
        indices, sqdist = reference.nearest_code(x, codebook)
        quantized = codebook[indices].to(x.dtype) if want_quantized else None
        return indices, sqdist, quantized

    def nearest_codes(self, x, codebook, k):
        _check_float32_range(x, codebook)
        return reference.nearest_codes(x, codebook, k)

    def sample_code(self, x, codebook, temperature, seed, cosine):
        return reference.sample_code(x, codebook, temperature, seed, cosine)

    def ema_stats(self, x, indices, num_codes):
        return reference.ema_stats(x, indices, num_codes)

    def quantize_backward(self, grad_quantized, x, codebook, indices, commit_scale, codebook_scale,
                          need_grad_x, need_grad_codebook, rotation_trick=False):
        grad_x, grad_codebook = reference.quantize_backward(
            grad_quantized, x, codebook, indices, commit_scale, codebook_scale, rotation_trick
        )
        return (grad_x if need_grad_x else None), (grad_codebook if need_grad_codebook else None)


def _check_float32_range(x: Tensor, codebook: Tensor) -> None:
    if torch.float64 not in (x.dtype, codebook.dtype):
        raise_if_out_of_range(range_check(x, codebook), x, codebook)
