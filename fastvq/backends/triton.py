"""The ``triton`` backend: fused Triton kernels (fastvq/triton) for CUDA tensors, and for CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1, slow; how the tests run them).

Triton is imported on first use, so this module imports without it and the backend
reports "triton is not installed" instead of failing to load.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics import KERNEL_DTYPE_NAMES
from .base import Backend
from .search_range import raise_if_out_of_range


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        self._kernels = None
        self._import_error: str | None = None

    def _load(self):
        if self._kernels is None and self._import_error is None:
            try:
                from .. import triton as kernels  # imports triton: slow, so only on first use

                self._kernels = kernels
            except ImportError as error:
                if getattr(error, "name", None) == "triton" or "No module named 'triton'" in str(error):
                    self._import_error = "triton is not installed (pip install triton, or fastvq[triton])"
                else:
                    self._import_error = f"fastvq.triton failed to import: {type(error).__name__}: {error}"
            except Exception as error:  # recorded, surfaced by fastvq.info and forced-backend errors
                self._import_error = f"fastvq.triton failed to import: {type(error).__name__}: {error}"
        return self._kernels

    def unavailable_reason(self) -> str | None:
        self._load()
        return self._import_error

    def describe(self) -> str:
        kernels = self._load()
        if kernels is None:
            return ""
        import triton

        if kernels.interpreting():
            where = "TRITON_INTERPRET=1: CPU tensors run in the interpreter"
        elif torch.cuda.is_available():
            where = "CUDA tensors"
        else:
            where = "no CUDA device here; CPU tensors only with TRITON_INTERPRET=1"
        modes = [f"float32 operands at input_precision {kernels.fp32_precision()!r}",
                 f"bf16 search kernel {kernels.search_kernel()!r}",
                 "deterministic reductions" if kernels.deterministic() else "atomic reductions"]
        return f"triton {triton.__version__}; {where}; {', '.join(modes)}"

    def not_supported_reasons(self, *tensors: Tensor) -> list[str]:
        kernels = self._load()
        if kernels is None:
            return [self._import_error]
        reasons = []
        for device in sorted({str(t.device) for t in tensors}):
            device_type = torch.device(device).type
            if device_type == "cpu" and not kernels.interpreting():
                reasons.append(f"device {device}: triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
            elif device_type == "cuda" and torch.version.hip is None:
                major, minor = torch.cuda.get_device_capability(device)
                if major < 7:
                    reasons.append(f"device {device}: compute capability {major}.{minor}; triton needs >= 7.0")
                elif major < 8 and any(t.dtype == torch.bfloat16 for t in tensors):
                    reasons.append(f"device {device}: bfloat16 tl.dot needs compute capability >= 8.0, "
                                   f"got {major}.{minor}")
            elif device_type not in ("cpu", "cuda"):
                reasons.append(f"device {device}: triton runs on CUDA tensors (or CPU under TRITON_INTERPRET=1)")
        for dtype in sorted({t.dtype for t in tensors if t.is_floating_point()}, key=str):
            if dtype not in KERNEL_DTYPE_NAMES:
                reasons.append(f"dtype {str(dtype).removeprefix('torch.')}: triton supports "
                               f"{', '.join(KERNEL_DTYPE_NAMES.values())}")
        return reasons

    def search_precision(self, device, x_dtype, codebook_dtype) -> str:
        # On CUDA, float32 operands (float32 or mixed inputs) multiply at fastvq.triton.fp32_precision();
        # bf16/fp16 of one dtype have exact products. The interpreter's tl.dot is a float32 numpy matmul
        # whatever its input_precision, but at "tf32x3" the kernels split x and the codes into TF32 parts
        # themselves (_score_tile.tf32x3_dot), so that bound applies there too.
        kernels = self._load()
        one_half_dtype = x_dtype == codebook_dtype and x_dtype in (torch.bfloat16, torch.float16)
        if kernels is None or one_half_dtype:
            return "ieee"
        precision = kernels.fp32_precision()
        if torch.device(device).type != "cuda" and precision != "tf32x3":
            return "ieee"
        return precision

    def nearest_code(self, x, codebook, want_quantized, hint=None):
        indices, sqdist, quantized, range_check = self._load().triton_nearest_code(x, codebook, want_quantized)
        raise_if_out_of_range(range_check, x, codebook)
        return indices, sqdist, (quantized if want_quantized else None)

    def op_not_supported_reasons(self, op: str) -> list[str]:
        # Each op's launcher is exported by fastvq.triton as triton_<op> (fastvq/triton/<op>.py).
        kernels = self._load()
        if kernels is not None and not hasattr(kernels, f"triton_{op}"):
            return [f"{op}: fastvq.triton has no kernel for it yet (fastvq/triton/{op}.py, exported as triton_{op})"]
        return []

    def nearest_codes(self, x, codebook, k):
        indices, sqdist, range_check = self._load().triton_nearest_codes(x, codebook, k)
        raise_if_out_of_range(range_check, x, codebook)
        return indices, sqdist

    def sample_code(self, x, codebook, temperature, seed, cosine):
        return self._load().triton_sample_code(x, codebook, temperature, seed, cosine)

    def ema_stats(self, x, indices, num_codes):
        return self._load().triton_ema_stats(x, indices, num_codes)

    def quantize_backward(self, grad_quantized, x, codebook, indices, commit_scale, codebook_scale,
                          need_grad_x, need_grad_codebook, rotation_trick=False):
        grad_x, grad_codebook = self._load().triton_quantize_backward(
            grad_quantized, x, codebook, indices, commit_scale, codebook_scale, need_grad_x, need_grad_codebook,
            rotation_trick,
        )
        return (grad_x if need_grad_x else None), (grad_codebook if need_grad_codebook else None)
