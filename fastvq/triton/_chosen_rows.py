"""The epilogue both Triton nearest_code searches end with (nearest_code.py's kernel, and the split search's
second kernel in nearest_code_split.py), once a row's code is known: in the original frame, gather e_idx,
write it as the quantized row, measure sqdist = ‖x − e_idx‖² directly in float32, and record the first
finite row whose ‖x − c‖² is beyond numerics.MAX_CENTRED_SQUARED_NORM, where a float32 search could
overflow (the launchers' range check, fastvq/backends/search_range.py).
"""
from __future__ import annotations

import triton.language as tl

from ..numerics import MAX_CENTRED_SQUARED_NORM as _MAX_CENTRED_SQUARED_NORM
from ._jit import device_function

MAX_CENTRED_SQUARED_NORM = tl.constexpr(_MAX_CENTRED_SQUARED_NORM)
# Columns per slice: (BLOCK_N, BLOCK_D) tiles of 64-bit pointers and float32 values spilled at
# BLOCK_D = 128 (compile_check).
EPILOGUE_D = tl.constexpr(32)


@device_function
def write_chosen_rows(x_rows, stride_xd, rows, row_mask, best_idx, centre_ptr, codebook_ptr, stride_cn, stride_cd,
                      indices_ptr, sqdist_ptr, quantized_ptr, range_check_ptr, N, d,
                      BLOCK_N: tl.constexpr, WRITE_QUANTIZED: tl.constexpr):
    """Indices (best_idx, int64), sqdist and, with WRITE_QUANTIZED, the quantized rows of the program's rows;
    the lowest out-of-range finite row into range_check_ptr[1] by an atomic min."""
    chosen = codebook_ptr + best_idx[:, None] * stride_cn
    sqdist = tl.zeros([BLOCK_N], tl.float32)
    x_norm = tl.zeros([BLOCK_N], tl.float32)
    non_finite = tl.zeros([BLOCK_N], tl.int32)
    lanes_e = tl.arange(0, EPILOGUE_D).to(tl.int64)
    for d0 in range(0, d, EPILOGUE_D):
        cols = d0 + lanes_e
        col_mask = cols < d
        mask = row_mask[:, None] & col_mask[None, :]
        x_f32 = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(chosen + cols[None, :] * stride_cd, mask=mask, other=0.0)
        diff = x_f32 - e.to(tl.float32)
        sqdist += tl.sum(diff * diff, axis=1)
        centred = x_f32 - tl.load(centre_ptr + cols, mask=col_mask, other=0.0)[None, :]
        x_norm += tl.sum(centred * centred, axis=1)
        non_finite += tl.sum((~(tl.abs(x_f32) < float("inf"))).to(tl.int32), axis=1)
        if WRITE_QUANTIZED:
            q_ptrs = quantized_ptr + rows[:, None] * d + cols[None, :]
            tl.store(q_ptrs, e.to(quantized_ptr.dtype.element_ty), mask=mask)
    tl.store(indices_ptr + rows, best_idx, mask=row_mask)
    tl.store(sqdist_ptr + rows, sqdist, mask=row_mask)
    out_of_range = row_mask & (non_finite == 0) & (x_norm > MAX_CENTRED_SQUARED_NORM)
    first_bad = tl.min(tl.where(out_of_range, rows, N), axis=0)
    tl.atomic_min(range_check_ptr + 1, first_bad, mask=first_bad < N, sem="relaxed")
