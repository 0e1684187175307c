"""The ``torch`` backend: fastvq.reference, which runs on any device and dtype."""
from __future__ import annotations

from torch import Tensor

from .. import reference
from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def unavailable_reason(self) -> str | None:
        return None

    def not_supported_reasons(self, *tensors: Tensor) -> list[str]:
        return []

    def nearest_code(self, x, codebook, want_quantized):
        indices, sqdist = reference.nearest_code(x, codebook)
        quantized = codebook[indices].to(x.dtype) if want_quantized else None
        return indices, sqdist, quantized

    def nearest_codes(self, x, codebook, k):
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
