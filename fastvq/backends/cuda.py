"""The ``cuda`` backend: fastvq's CUDA C++ kernels (csrc/cuda, built into ``fastvq._cuda``).

Built when the package is installed with a CUDA compiler (FASTVQ_CUDA=ON, or AUTO with nvcc
found). Outputs are allocated here with torch (its caching allocator); the extension enqueues
its kernels on the caller's current stream of the tensors' device and never synchronises.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from .. import reference
from ..numerics import KERNEL_DTYPE_NAMES, deterministic, first_out_of_range_code, search_centre, sort_by_code
from .base import Backend
from .search_range import raise_if_out_of_range

try:
    from .. import _cuda
except ImportError as error:  # surfaced by unavailable_reason(), fastvq.info and forced-backend errors
    _cuda = None
    if getattr(error, "name", None) == "fastvq._cuda":
        _IMPORT_ERROR = "fastvq._cuda is not built (reinstall with a CUDA toolkit: FASTVQ_CUDA=ON pip install .)"
    else:
        _IMPORT_ERROR = f"fastvq._cuda failed to load: {type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = None


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        self._ext = _cuda
        self._import_error = _IMPORT_ERROR

    def unavailable_reason(self) -> str | None:
        if self._ext is None:
            return self._import_error
        if not torch.cuda.is_available():
            return (f"no CUDA device visible to torch {torch.__version__} "
                    f"(driver: {self._ext.driver_version()})")
        return None

    def describe(self) -> str:
        if self._ext is None:
            return ""
        return (f"built for sm {self._ext.built_archs()}, CUDA runtime {self._ext.runtime_version()}, "
                f"driver {self._ext.driver_version()}")

    def _min_arch(self) -> tuple[int, int] | None:
        numbers = [int(m.group(1)) for m in re.finditer(r"(\d+)", self._ext.built_archs())]
        return divmod(min(numbers), 10) if numbers else None

    def not_supported_reasons(self, *tensors: Tensor) -> list[str]:
        reason = self.unavailable_reason()
        if reason is not None:
            return [reason]
        reasons = []
        for device in sorted({str(t.device) for t in tensors}):
            if torch.device(device).type != "cuda":
                reasons.append(f"device {device}: the cuda backend needs CUDA tensors")
            elif torch.version.hip is not None:
                reasons.append(f"device {device}: fastvq._cuda is built for NVIDIA GPUs, this torch is ROCm")
            else:
                capability = torch.cuda.get_device_capability(device)
                lowest = self._min_arch()
                if lowest is not None and capability < lowest:
                    reasons.append(f"device {device}: compute capability {capability[0]}.{capability[1]}, "
                                   f"but fastvq._cuda was built for sm {self._ext.built_archs()}")
        float_dtypes = {t.dtype for t in tensors if t.is_floating_point()}
        for dtype in sorted(float_dtypes, key=str):
            if dtype not in KERNEL_DTYPE_NAMES:
                reasons.append(f"dtype {str(dtype).removeprefix('torch.')}: cuda supports "
                               f"{', '.join(KERNEL_DTYPE_NAMES.values())}")
        if len(float_dtypes) > 1:
            names = ", ".join(str(d).removeprefix("torch.") for d in sorted(float_dtypes, key=str))
            reasons.append(f"dtypes {names}: the cuda backend needs x and codebook in one dtype")
        return reasons

    # DLPack export refuses tensors that require grad and tensors off the current device, so
    # every call detaches and runs under the tensors' device.
    def _stream(self, device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    def nearest_code(self, x, codebook, want_quantized, hint=None):
        # The search runs around c = search_centre(codebook) (issue 12, finding 5); the range check
        # reads back the first out-of-range code and row: one host synchronisation (search_range.py).
        x, codebook = x.detach(), codebook.detach().contiguous()
        num_rows, dim = x.shape
        indices = torch.empty((num_rows,), dtype=torch.int64, device=x.device)
        sqdist = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
        norms = torch.empty((codebook.shape[0],), dtype=torch.float32, device=x.device)
        quantized = torch.empty((num_rows, dim), dtype=x.dtype, device=x.device) if want_quantized else None
        with torch.cuda.device(x.device):
            centre = search_centre(codebook)
            range_check = torch.full((2,), num_rows, dtype=torch.int64, device=x.device)
            self._ext.nearest_code(x, codebook, centre, norms, indices, sqdist, range_check[1:], quantized,
                                   stream=self._stream(x.device))
            range_check[0] = first_out_of_range_code(codebook, norms)
        raise_if_out_of_range(range_check, x, codebook)
        return indices, sqdist, quantized

    # The CUDA C++ extension has no top-k kernel; the fused one is Triton's (backend "triton").
    NEAREST_CODES_FALLBACK = ("nearest_codes runs fastvq.reference (chunked torch on the GPU): the CUDA C++ "
                              "extension has no top-k kernel; backend='triton' has the fused one")

    SAMPLE_CODE_FALLBACK = ("sample_code runs fastvq.reference (chunked torch on the GPU): the CUDA C++ extension "
                            "has no sampling kernel; backend='triton' has the fused one")

    def op_fallbacks(self) -> dict[str, str]:
        return {"nearest_codes": self.NEAREST_CODES_FALLBACK, "sample_code": self.SAMPLE_CODE_FALLBACK}

    def sample_code(self, x, codebook, temperature, seed, cosine):
        return reference.sample_code(x.detach(), codebook.detach(), temperature, seed, cosine)

    def nearest_codes(self, x, codebook, k):
        return reference.nearest_codes(x.detach(), codebook.detach(), k)

    def ema_stats(self, x, indices, num_codes):
        x, indices = x.detach(), indices.detach().contiguous()
        with torch.cuda.device(x.device):
            stream = self._stream(x.device)
            if deterministic():
                sums = torch.empty((num_codes, x.shape[1]), dtype=torch.float32, device=x.device)
                perm, offsets = sort_by_code(indices, num_codes)
                self._ext.segment_sum(x, perm, offsets, sums, None, stream=stream)
                return (offsets[1:] - offsets[:-1]).to(torch.float32), sums
            counts = torch.empty((num_codes,), dtype=torch.int64, device=x.device)
            wide_sums = torch.empty((num_codes, x.shape[1]), dtype=torch.float64, device=x.device)
            self._ext.ema_stats(x, indices, counts, wide_sums, stream=stream)
        return counts.to(torch.float32), wide_sums.to(torch.float32)

    def quantize_backward(self, grad_quantized, x, codebook, indices, commit_scale, codebook_scale,
                          need_grad_x, need_grad_codebook, rotation_trick=False):
        grad_quantized, x = grad_quantized.detach(), x.detach()
        codebook, indices = codebook.detach().contiguous(), indices.detach().contiguous()
        commit_scale = commit_scale.detach().to(device=x.device, dtype=torch.float32)
        codebook_scale = codebook_scale.detach().to(device=x.device, dtype=torch.float32)
        sorted_sums = need_grad_codebook and deterministic()
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_grad_x else None
        accumulated = None
        if need_grad_codebook:  # float64 atomics (quantize_backward.cu); the sorted sums are float32
            accumulated = torch.empty(codebook.shape, dtype=torch.float32 if sorted_sums else torch.float64,
                                      device=x.device)
        with torch.cuda.device(x.device):
            stream = self._stream(x.device)
            if need_grad_x or (need_grad_codebook and not sorted_sums):
                self._ext.quantize_backward(grad_quantized, x, codebook, indices, commit_scale, grad_x,
                                            None if sorted_sums else accumulated, stream=stream,
                                            rotation_trick=rotation_trick)
            if sorted_sums:
                perm, offsets = sort_by_code(indices, codebook.shape[0])
                self._ext.segment_sum(x, perm, offsets, accumulated, codebook, stream=stream)
        grad_codebook = None
        if need_grad_codebook:  # × the scale in the accumulator's precision, rounded once
            grad_codebook = (accumulated * codebook_scale.to(accumulated.dtype)).to(codebook.dtype)
        return grad_x, grad_codebook
