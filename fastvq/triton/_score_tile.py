"""The code-tile step both Triton searches share (nearest_code.py, nearest_codes.py): the centred x
tile a program keeps, and one (BLOCK_N, BLOCK_K) tile of scores ‖e'_k‖² − 2 x'_i·e'_k in the centred
frame (x' = x − c, e' = e − c; nearest_code.py's docstring has the derivation). The two kernels differ
only in what they fold the scores into: a running argmin, or a sorted top-k list.
"""
from __future__ import annotations

import triton.language as tl

from ._jit import device_function


@device_function
def centred_x_slice(x_rows, stride_xd, row_mask, centre_ptr, cols, d, codes_ptr, CAST_TO_FP32: tl.constexpr):
    """Columns ``cols`` of the program's rows of x − c, rounded to the codes' dtype (then float32 with
    CAST_TO_FP32); zero past d and on rows past N."""
    col_mask = cols < d
    x_slice = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    centre = tl.load(centre_ptr + cols, mask=col_mask, other=0.0)
    x_slice = (x_slice.to(tl.float32) - centre[None, :]).to(codes_ptr.dtype.element_ty)
    if CAST_TO_FP32:
        x_slice = x_slice.to(tl.float32)
    return x_slice


@device_function
def centred_x_tile(x_rows, stride_xd, row_mask, centre_ptr, lanes_d, d, codes_ptr,
                   CAST_TO_FP32: tl.constexpr, X_RESIDENT: tl.constexpr):
    """The program's rows of x − c (centred_x_slice), held in registers for the whole codebook walk when
    X_RESIDENT (d <= BLOCK_D); else a placeholder that the d-sliced score_tile never reads."""
    if X_RESIDENT:
        x_tile = centred_x_slice(x_rows, stride_xd, row_mask, centre_ptr, lanes_d, d, codes_ptr, CAST_TO_FP32)
    else:
        x_tile = tl.zeros([1], tl.float32)
    return x_tile


@device_function
def score_tile(x_tile, x_rows, stride_xd, row_mask, centre_ptr, codes_ptr, code_norms_ptr, codes, code_mask,
               lanes_d, d,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               CAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, X_RESIDENT: tl.constexpr):
    """(BLOCK_N, BLOCK_K) float32 scores of the program's rows against the codes ``codes`` (int64, BLOCK_K)
    of the centred codebook (contiguous (K, d)). A NaN or ±inf score, and a code past K, score +inf
    (fastvq/reference.py's non-finite rule)."""
    codes_t = codes_ptr + codes[None, :] * d  # tiles loaded transposed, (BLOCK_D, BLOCK_K), for x @ eᵀ
    if X_RESIDENT:  # no inner loop, so Triton software-pipelines the caller's (innermost) loop's loads
        e_t = tl.load(codes_t + lanes_d[:, None], mask=(lanes_d[:, None] < d) & code_mask[None, :], other=0.0)
        if CAST_TO_FP32:
            e_t = e_t.to(tl.float32)
        xe = tl.dot(x_tile, e_t, input_precision=INPUT_PRECISION)
    else:
        xe = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + lanes_d
            col_mask = cols < d
            e_t = tl.load(codes_t + cols[:, None], mask=col_mask[:, None] & code_mask[None, :], other=0.0)
            if CAST_TO_FP32:
                e_t = e_t.to(tl.float32)
            x_t = centred_x_slice(x_rows, stride_xd, row_mask, centre_ptr, cols, d, codes_ptr, CAST_TO_FP32)
            xe = tl.dot(x_t, e_t, xe, input_precision=INPUT_PRECISION)
    norms = tl.load(code_norms_ptr + codes, mask=code_mask, other=0.0)
    score = tl.fma(xe, -2.0, norms[None, :])  # explicit: Triton's default FP fusion may change
    usable = (score == score) & (tl.abs(score) < float("inf")) & code_mask[None, :]
    return tl.where(usable, score, float("inf"))
