"""
fastvq CUDA kernels. Tensors: CUDA, one device; x float32/float16/bfloat16 with any strides.
Work is enqueued on `stream` (torch.cuda.current_stream(device).cuda_stream).
Bindings: csrc/cuda/bindings.cpp; each kernel names its source file.
"""

from typing import Annotated

from numpy.typing import NDArray


def nearest_code(x: Annotated[NDArray, dict(writable=False)], codebook: Annotated[NDArray, dict(writable=False)], centre: Annotated[NDArray, dict(writable=False)], code_norms_scratch: NDArray, indices_out: NDArray, sqdist_out: NDArray, first_bad_row: NDArray, quantized_out: NDArray | None = None, *, stream: int) -> None:
    """
    indices_out[i] = argmin_k ||x[i] - codebook[k]||^2 (ties -> lowest k; non-finite distance = +inf),
    searched around centre (float32 (d,), fastvq.numerics.search_centre); sqdist_out[i] = that squared
    distance computed directly (float32), quantized_out[i] = codebook[idx]. code_norms_scratch: float32
    (K,), overwritten with ||e - c||^2. first_bad_row: int64 (1,), set to N by the caller, lowered to the
    first finite row with ||x - c||^2 > FLT_MAX/8. Source: csrc/cuda/nearest_code.cu.
    """

def ema_stats(x: Annotated[NDArray, dict(writable=False)], indices: Annotated[NDArray, dict(writable=False)], counts_out: NDArray, sums_out: NDArray, *, stream: int) -> None:
    """
    counts_out[k] = #{i: indices[i] == k} (int64), sums_out[k] = sum of x[i] over those i (float64);
    64-bit atomics, overwritten. Indices outside [0, K) are ignored. Source: csrc/cuda/ema_stats.cu.
    """

def segment_sum(x: Annotated[NDArray, dict(writable=False)], perm: Annotated[NDArray, dict(writable=False)], offsets: Annotated[NDArray, dict(writable=False)], out: NDArray, codebook: Annotated[NDArray, dict(writable=False)] | None = None, *, stream: int) -> None:
    """
    Deterministic: out[k] = sum over s in [offsets[k], offsets[k+1]) of x[perm[s]], or of
    codebook[k] - x[perm[s]] when codebook is given (overwritten). Source: csrc/cuda/ema_stats.cu.
    """

def quantize_backward(grad_quantized: Annotated[NDArray, dict(writable=False)], x: Annotated[NDArray, dict(writable=False)], codebook: Annotated[NDArray, dict(writable=False)], indices: Annotated[NDArray, dict(writable=False)], commit_scale: Annotated[NDArray, dict(writable=False)], grad_x_out: NDArray | None = None, grad_codebook_out: NDArray | None = None, *, stream: int, rotation_trick: bool = False) -> None:
    """
    grad_x_out = G + commit_scale * (x - codebook[indices]) in x's dtype, G = grad_quantized or, with
    rotation_trick, the rotation trick's (|q|/|x|) R^T grad_quantized (fastvq.reference.quantize_backward);
    grad_codebook_out[k] = sum over indices[i] == k of (codebook[k] - x[i]), float64 atomics (overwritten).
    Source: csrc/cuda/quantize_backward.cu.
    """

def built_archs() -> str:
    """
    The CMAKE_CUDA_ARCHITECTURES this extension was compiled for, e.g. '80;90'.
    """

def runtime_version() -> str:
    """CUDA runtime version linked in, e.g. '13.0'."""

def driver_version() -> str:
    """Installed CUDA driver's version, or why there is none."""
