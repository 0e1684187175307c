"""nearest_codes (top-k) in Triton, registered as ``fastvq::triton_nearest_codes``.

The same tiled search as nearest_code.py (centred frame, x' = x − c and e' = e − c with
c = numerics.search_centre, scores ‖e'_k‖² − 2 x'_i·e'_k, a NaN or ±inf score counting as +inf;
no N×K buffer), with a different epilogue per code tile: each program keeps, per row, a sorted
list of the KPAD = next_power_of_2(k) smallest (score, index) pairs seen so far, as one int64 key
per pair,

    key = (order-preserving int32 of the score) << 32 | index

so that comparing keys compares scores and, on equal scores, indices: ties go to the lower index
and the order is exact and deterministic. Per code tile the tile's KPAD smallest keys
(a bitonic top-k, fastvq/triton/_bitonic.py), in descending order T, are merged into the running
list L by the bitonic rule: the KPAD smallest of L ∪ T are min(L_j, T_j), a bitonic sequence that
one bitonic merge sorts. A tile whose smallest score is above every row's last listed score cannot
enter (its indices are higher than the listed ones), so its top-k and merge are skipped: with the
lists full, that is most tiles of a large codebook.
Padding (codes past K, the initial list) is the largest int64 key, so it sorts after every real
code, +inf scores included; k <= K means it never reaches the output.

The epilogue measures sqdist = ‖x_i − e_j‖² of each listed code directly, in float32 in the
original frame, and records the first finite row beyond the centred search's range (as
nearest_code does; fastvq/backends/search_range.py raises on it).

Launch parameters are fixed per KPAD, not autotuned (the list's registers grow with BLOCK_N·KPAD).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ._bitonic import merge_ascending, smallest_descending
from ._chosen_rows import MAX_CENTRED_SQUARED_NORM
from ._jit import MAX_BLOCK_D, block_d_for, device_function, interpreting, kernel, launch, search_precision
from ._score_tile import centred_x_tile, ordered_score, score_tile
from .nearest_code import _TENSOR_CORE_DTYPES, centred_codebook, rows_as_searched, splits_tf32

PADDING_KEY = tl.constexpr(0x7FFFFFFFFFFFFFFF)


@kernel()
def _nearest_codes_kernel(
    x_ptr, centre_ptr, codes_ptr, code_norms_ptr, codebook_ptr,
    indices_ptr, sqdist_ptr, range_check_ptr,
    N, K, d, k,
    stride_xn, stride_xd, stride_cn, stride_cd,
    CAST_TO_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    X_RESIDENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    KPAD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    x_rows = x_ptr + rows[:, None] * stride_xn
    lanes_d = tl.arange(0, BLOCK_D).to(tl.int64)  # int64: a column times a large stride does not overflow
    lanes_k = tl.arange(0, BLOCK_K)

    x_tile = centred_x_tile(x_rows, stride_xd, row_mask, centre_ptr, lanes_d, d, codes_ptr,
                            CAST_TO_FP32, X_RESIDENT)
    best = tl.full([BLOCK_N, KPAD], PADDING_KEY, tl.int64)  # ascending keys
    worst_kept = tl.full([BLOCK_N], PADDING_KEY >> 32, tl.int32)  # each row's last key's score part
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + lanes_k.to(tl.int64)
        code_mask = codes < K
        score = score_tile(x_tile, x_rows, stride_xd, row_mask, centre_ptr, codes_ptr, code_norms_ptr,
                           codes, code_mask, lanes_d, d,
                           BLOCK_N, BLOCK_K, BLOCK_D, CAST_TO_FP32, INPUT_PRECISION, X_RESIDENT)
        if KPAD == 1:
            best = tl.minimum(best, tl.min(keys_of(score, codes, code_mask), axis=1, keep_dims=True))
        else:
            # A tile enters a row's list only if its smallest score is at most the list's last one (its codes'
            # indices are all higher, so an equal score does not enter either; merging it anyway is exact).
            # Once the lists fill, most tiles of a large codebook enter none: skip their top-k and merge.
            entering = ordered_score(tl.min(score, axis=1)) <= worst_kept
            if tl.max(entering.to(tl.int32), axis=0) > 0:
                best = merge_ascending(best, smallest_descending(keys_of(score, codes, code_mask), KPAD))
                worst_kept = (tl.max(best, axis=1) >> 32).to(tl.int32)

    # Epilogue, in the original frame: the range check's ‖x − c‖², then each listed code's sqdist.
    x_norm = tl.zeros([BLOCK_N], tl.float32)
    non_finite = tl.zeros([BLOCK_N], tl.int32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + lanes_d
        col_mask = cols < d
        x_f32 = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0).to(tl.float32)
        centred = x_f32 - tl.load(centre_ptr + cols, mask=col_mask, other=0.0)[None, :]
        x_norm += tl.sum(centred * centred, axis=1)
        non_finite += tl.sum((~(tl.abs(x_f32) < float("inf"))).to(tl.int32), axis=1)
    out_of_range = row_mask & (non_finite == 0) & (x_norm > MAX_CENTRED_SQUARED_NORM)
    first_bad = tl.min(tl.where(out_of_range, rows, N), axis=0)
    tl.atomic_min(range_check_ptr + 1, first_bad, mask=first_bad < N, sem="relaxed")

    positions = tl.arange(0, KPAD)
    listed = best & 0x7FFFFFFF  # the index (< 2^31) in the low bits
    for j in range(0, k):
        code = tl.sum(tl.where(positions[None, :] == j, listed, 0), axis=1)  # column j of the list
        chosen = codebook_ptr + code[:, None] * stride_cn
        sqdist = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + lanes_d
            mask = row_mask[:, None] & (cols[None, :] < d)
            x_f32 = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            e = tl.load(chosen + cols[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
            diff = x_f32 - e
            sqdist += tl.sum(diff * diff, axis=1)
        tl.store(indices_ptr + rows * k + j, code, mask=row_mask)
        tl.store(sqdist_ptr + rows * k + j, sqdist, mask=row_mask)


@device_function
def keys_of(score, codes, code_mask):
    """(BLOCK_N, BLOCK_K) int64 keys ordered_score << 32 | index of a score tile; PADDING_KEY past K."""
    keys = (ordered_score(score).to(tl.int64) << 32) | codes[None, :]
    return tl.where(code_mask[None, :], keys, PADDING_KEY)


def launch_config(kpad: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a list of kpad keys: BLOCK_K >= kpad for tl.topk, and
    BLOCK_N·kpad bounded so the list and the tile's keys fit in registers."""
    if interpreting():
        return 64, max(64, kpad), 4
    if kpad <= 16:
        return 64, 64, 4
    return 32, kpad if kpad > 64 else 64, 8


@triton_op("fastvq::triton_nearest_codes", mutates_args={})
def triton_nearest_codes(x: Tensor, codebook: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """indices int64 (N, k) (each row's k nearest codes, nearest first, ties to the lower index),
    sqdist float32 (N, k), and the range check int64 (2,) of nearest_code.

    x (N, d) and codebook (K, d) in float32/bfloat16/float16, any strides, 1 <= k <= min(K, 64).
    """
    num_rows, dim = x.shape
    num_codes = codebook.shape[0]
    indices = torch.empty((num_rows, k), dtype=torch.int64, device=x.device)
    sqdist = torch.empty((num_rows, k), dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return indices, sqdist, torch.tensor([num_codes, 0], device=x.device)
    tensor_cores = x.dtype == codebook.dtype and x.dtype in _TENSOR_CORE_DTYPES
    upcast = not tensor_cores or (interpreting() and x.dtype == torch.bfloat16)  # see nearest_code.py
    cap = MAX_BLOCK_D if not upcast else MAX_BLOCK_D // 2
    block_d = block_d_for(dim, cap)
    if dim > block_d:  # as nearest_code: half-width d-slices
        block_d = block_d_for(dim, cap // 2)
    precision = search_precision(x.dtype, codebook.dtype)
    centre, codes, code_norms, first_bad_code = centred_codebook(
        codebook, codebook.dtype if tensor_cores else torch.float32,
        tf32_split=splits_tf32(upcast, precision, dim <= block_d))
    range_check = torch.stack([first_bad_code, torch.full_like(first_bad_code, num_rows)])
    searched = rows_as_searched(x, codebook, precision)
    kpad = triton.next_power_of_2(k)
    block_n, block_k, num_warps = launch_config(kpad)
    launch(
        _nearest_codes_kernel, (triton.cdiv(num_rows, block_n),),
        searched, centre, codes, code_norms, codebook,
        indices, sqdist, range_check,
        num_rows, num_codes, dim, k,
        searched.stride(0), searched.stride(1), codebook.stride(0), codebook.stride(1),
        CAST_TO_FP32=upcast,
        INPUT_PRECISION=precision,
        BLOCK_D=block_d,
        X_RESIDENT=dim <= block_d,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        KPAD=kpad,
        num_warps=num_warps,
        num_stages=2,
    )
    return indices, sqdist, range_check
