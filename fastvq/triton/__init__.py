"""fastvq's Triton kernels, each registered with ``torch.library.triton_op`` (so
``torch.compile`` sees the kernels inside) and called by fastvq.backends.triton:

    triton_nearest_code(x, codebook, want_quantized)      nearest_code.py       fastvq::triton_nearest_code
    triton_nearest_codes(x, codebook, k)                  nearest_codes.py      fastvq::triton_nearest_codes
    triton_quantize_backward(grad_q, x, codebook, ...)     quantize_backward.py  fastvq::triton_quantize_backward
    triton_ema_stats(x, indices, num_codes)               ema_stats.py          fastvq::triton_ema_stats
    triton_sample_code(x, codebook, temperature, seed, cosine)  sample_code.py  fastvq::triton_sample_code

Options:
    set_fp32_precision("tf32x3" | "tf32" | "ieee") /   tl.dot on float32 operands (float32 or mixed inputs):
    FASTVQ_TRITON_FP32_PRECISION                     3xTF32 tensor cores (default), one TF32 product, or FMA
    set_allow_tf32(True) / FASTVQ_TRITON_TF32=1      the same as "tf32"
    set_search_kernel("triton" | "gluon") /          bf16 nearest_code on Hopper, d <= 64: the Triton kernel
    FASTVQ_TRITON_SEARCH_KERNEL                      (default) or the Gluon one whose wgmma overlaps the argmin
    torch.use_deterministic_algorithms(True) /
    FASTVQ_DETERMINISTIC=1                           sort-and-segment reductions instead of float atomics

CPU tensors run under Triton's interpreter when TRITON_INTERPRET=1 (slow; for tests).
Importing this package needs triton; fastvq.backends.triton reports its absence.
"""
from ._jit import (allow_tf32, deterministic, fp32_precision, interpreting, search_kernel, set_allow_tf32,
                   set_fp32_precision, set_search_kernel)
from .ema_stats import triton_ema_stats
from .nearest_code import gluon_search_reason, triton_nearest_code
from .nearest_codes import triton_nearest_codes
from .quantize_backward import triton_quantize_backward
from .sample_code import triton_sample_code

__all__ = [
    "allow_tf32",
    "deterministic",
    "fp32_precision",
    "gluon_search_reason",
    "interpreting",
    "search_kernel",
    "set_allow_tf32",
    "set_fp32_precision",
    "set_search_kernel",
    "triton_ema_stats",
    "triton_nearest_code",
    "triton_nearest_codes",
    "triton_quantize_backward",
    "triton_sample_code",
]
