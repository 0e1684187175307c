"""The ``cpu`` backend: the fused C++ kernels of ``fastvq._cpu`` (OpenMP + AVX2).

The kernels compute in float32 on C-contiguous arrays. This wrapper converts inputs
(copying only when needed), allocates the outputs with torch, passes
``torch.get_num_threads()`` to the kernels and converts outputs back to the input dtype.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ..numerics import KERNEL_DTYPE_NAMES
from .base import Backend

# Caps the SIMD level the kernels use (portable, avx2, avx512); for benchmarks that must run
# as on an older CPU. Unset: the best level this CPU supports.
SIMD_ENV_VAR = "FASTVQ_CPU_SIMD"

try:
    from .. import _cpu
except ImportError as error:  # surfaced by unavailable_reason(), fastvq.info and forced-backend errors
    _cpu = None
    _IMPORT_ERROR: str | None = f"fastvq._cpu failed to import ({error}); build it with `pip install -e .`"
else:
    _IMPORT_ERROR = None
    if os.environ.get(SIMD_ENV_VAR):
        try:
            _cpu.set_simd_level(os.environ[SIMD_ENV_VAR])
        except ValueError as error:
            _IMPORT_ERROR = f"${SIMD_ENV_VAR}={os.environ[SIMD_ENV_VAR]!r}: {error}"

# Index dtype the kernels read without conversion.
INDEX_DTYPE = torch.int64


def _as_f32(t: Tensor) -> Tensor:
    """float32, C-contiguous, no autograd history; a copy only if one of those is missing."""
    return t.detach().to(torch.float32).contiguous()


def _as_index(t: Tensor) -> Tensor:
    return t.detach().to(INDEX_DTYPE).contiguous()


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self) -> str | None:
        return _IMPORT_ERROR

    def describe(self) -> str:
        if _IMPORT_ERROR is not None:
            return ""
        capped = f", capped by ${SIMD_ENV_VAR}" if os.environ.get(SIMD_ENV_VAR) else ""
        return (f"simd {_cpu.simd_level()} (best here: {_cpu.best_simd_level()}{capped}), "
                f"OpenMP {'on' if _cpu.openmp_enabled() else 'off'}")

    def not_supported_reasons(self, *tensors: Tensor) -> list[str]:
        reasons = []
        if _IMPORT_ERROR is not None:
            reasons.append(_IMPORT_ERROR)
        for t in tensors:
            if t is None:
                continue
            if t.device.type != "cpu":
                reasons.append(f"device {t.device}: the cpu backend needs CPU tensors")
            if t.is_floating_point() and t.dtype not in KERNEL_DTYPE_NAMES:
                if t.dtype == torch.float64:
                    reasons.append(
                        "dtype torch.float64: the cpu kernels compute in float32; float64 goes to the torch backend"
                    )
                else:
                    reasons.append(f"dtype {t.dtype}: the cpu kernels take float32, bfloat16 or float16")
        return list(dict.fromkeys(reasons))  # one line per distinct reason, in order

    def nearest_code(self, x: Tensor, codebook: Tensor, want_quantized: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        xf, cf = _as_f32(x), _as_f32(codebook)
        n, d = xf.shape
        indices = torch.empty(n, dtype=INDEX_DTYPE)
        sqdist = torch.empty(n, dtype=torch.float32)
        quantized = torch.empty(n, d, dtype=torch.float32) if want_quantized else None
        _cpu.nearest_code(xf, cf, indices, sqdist, quantized, torch.get_num_threads())
        if quantized is not None and quantized.dtype != x.dtype:
            quantized = quantized.to(x.dtype)
        return indices, sqdist, quantized

    def op_not_supported_reasons(self, op: str) -> list[str]:
        if _IMPORT_ERROR is None and not hasattr(_cpu, op):
            return [f"{op}: fastvq._cpu has no kernel for it (rebuild with `pip install -e .`)"]
        return []

    def nearest_codes(self, x: Tensor, codebook: Tensor, k: int) -> tuple[Tensor, Tensor]:
        xf, cf = _as_f32(x), _as_f32(codebook)
        indices = torch.empty(xf.shape[0], k, dtype=INDEX_DTYPE)
        sqdist = torch.empty(xf.shape[0], k, dtype=torch.float32)
        _cpu.nearest_codes(xf, cf, indices, sqdist, torch.get_num_threads())
        return indices, sqdist

    def sample_code(self, x: Tensor, codebook: Tensor, temperature: float, seed: int, cosine: bool) -> Tensor:
        xf, cf = _as_f32(x), _as_f32(codebook)
        indices = torch.empty(xf.shape[0], dtype=INDEX_DTYPE)
        _cpu.sample_code(xf, cf, indices, temperature, seed, cosine, torch.get_num_threads())
        return indices

    def ema_stats(self, x: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
        xf = _as_f32(x)
        counts = torch.empty(num_codes, dtype=torch.float32)
        sums = torch.empty(num_codes, xf.shape[1], dtype=torch.float32)
        _cpu.ema_stats(xf, _as_index(indices), counts, sums, torch.get_num_threads())
        return counts, sums

    def quantize_backward(
        self,
        grad_quantized: Tensor | None,
        x: Tensor,
        codebook: Tensor,
        indices: Tensor,
        commit_scale: Tensor,
        codebook_scale: Tensor,
        need_grad_x: bool,
        need_grad_codebook: bool,
        rotation_trick: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        if not (need_grad_x or need_grad_codebook):
            return None, None
        xf, cf = _as_f32(x), _as_f32(codebook)
        gq = None if grad_quantized is None else _as_f32(grad_quantized)
        grad_x = torch.empty_like(xf) if need_grad_x else None
        grad_codebook = torch.empty_like(cf) if need_grad_codebook else None
        _cpu.quantize_backward(
            gq, xf, cf, _as_index(indices), float(commit_scale), float(codebook_scale),
            grad_x, grad_codebook, torch.get_num_threads(), rotation_trick=rotation_trick,
        )
        if grad_x is not None and grad_x.dtype != x.dtype:
            grad_x = grad_x.to(x.dtype)
        if grad_codebook is not None and grad_codebook.dtype != codebook.dtype:
            grad_codebook = grad_codebook.to(codebook.dtype)
        return grad_x, grad_codebook
