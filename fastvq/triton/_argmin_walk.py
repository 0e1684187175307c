"""The main loop both nearest_code searches share (nearest_code.py's unsplit kernel, and each code range
of nearest_code_split.py): one program's rows against whole BLOCK_K tiles of the centred, padded codes
(nearest_code.centred_codebook), folded into each row's smallest score and the lowest code index with it.
nearest_code.py's docstring derives the fold and the non-finite rule.

With FOLD_NORMS (bf16 on tensor cores) the codes are stored negated, −e', beside three bf16 pieces per
code whose sum is exactly ‖e'‖²/2 (nearest_code.norm_pieces); per tile, one dot gives x'·(−e') and a
second, of ones by the pieces, adds ‖e'‖²/2 onto its accumulator, so the tensor cores hand back

    score/2 = ‖e'‖²/2 − x'·e'

and the loop does no arithmetic per score element before its running minimum. Halving every score
keeps their order and ties, so the argmin is the same as for ‖e'‖² − 2x'·e' (one FFMA per element).
The half-norm is added last, as the FFMA added the norm last; the tensor cores may round each
piece's addition, up to two roundings more than the FFMA's one, each at most u·(‖e'‖²/2 +
Σ|x'e'|); none on integer data, where every sum is exact.
"""
from __future__ import annotations

import triton.language as tl

from ._jit import device_function
from ._score_tile import code_row_length, code_tile_dot

# Columns of the norm pieces' matrix (K', NORM_PIECES): the smallest k-extent of a bf16 dot; the
# three pieces, then zeros.
NORM_PIECES = tl.constexpr(16)


@device_function
def argmin_walk(x_tile, x_rows, stride_xd, row_mask, centre_ptr, codes_ptr, code_norms_ptr, first, end,
                lanes_d, d,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                CAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, X_RESIDENT: tl.constexpr,
                FOLD_NORMS: tl.constexpr):
    """Per row of the program, over codes [first, end) (int32 multiples of BLOCK_K, within the padded codes):
    (best score, int32 lowest index achieving it), with a non-finite best made (+inf, 0) (the
    non-finite rule). ``code_norms_ptr`` is the (K',) norms, or with FOLD_NORMS the (K', NORM_PIECES)
    norm pieces."""
    # Column groups (nearest_code.py's docstring), and whether to save the improving tiles' scores.
    GROUPS: tl.constexpr = BLOCK_K // 2 if CAST_TO_FP32 else 4
    RUN: tl.constexpr = 2
    STRIDED: tl.constexpr = BLOCK_K // (GROUPS * RUN)
    SAVE_TILES: tl.constexpr = X_RESIDENT and not CAST_TO_FP32
    FMA_DOT: tl.constexpr = CAST_TO_FP32 and INPUT_PRECISION == "ieee"
    strided = (tl.arange(0, STRIDED) * (GROUPS * RUN))[:, None, None] + tl.arange(0, RUN)[None, None, :]
    group_start = (tl.arange(0, GROUPS) * RUN)[None, :, None]
    columns = (strided + group_start)[None, :, :, :]
    lanes_k = tl.arange(0, BLOCK_K)[None, :]
    # Norms at a per-thread base (advanced per tile) + per-register constants: one address per tile.
    start = tl.cast(first, tl.int64)  # int64: first·d can pass 2^31
    norms = code_norms_ptr + start + group_start
    row = code_row_length(d, CAST_TO_FP32, INPUT_PRECISION, X_RESIDENT)
    tile = codes_ptr + start * row
    if FOLD_NORMS:
        ones = tl.full([BLOCK_N, NORM_PIECES], 1.0, tl.float32 if CAST_TO_FP32 else codes_ptr.dtype.element_ty)
        piece_offsets = lanes_k * NORM_PIECES + tl.arange(0, NORM_PIECES)[:, None]  # a tile's, transposed
        pieces = code_norms_ptr + start * NORM_PIECES
    part = tl.full([BLOCK_N, GROUPS], float("inf"), tl.float32)
    part_idx = tl.zeros([BLOCK_N, GROUPS], tl.int32)
    saved = tl.full([BLOCK_N, STRIDED, GROUPS, RUN], float("inf"), tl.float32)
    for k0 in range(first, end, BLOCK_K):
        # The FMA dot ("ieee") spills when int32 row offsets are kept across the loop (compile_check), so it
        # forms 64-bit ones per tile; tensor cores (3xTF32 included) take one scalar base per tile: fp32 d=33
        # tf32x3 went from 48.4 to 39.9 SASS per element on sm_90 with it, no spills at any config.
        code_rows = codes_ptr + (k0 + lanes_k).to(tl.int64) * row if FMA_DOT else tile + lanes_k * row
        xe = code_tile_dot(x_tile, x_rows, stride_xd, row_mask, centre_ptr, codes_ptr, code_rows, None, lanes_d,
                           d, None, BLOCK_N, BLOCK_K, BLOCK_D, CAST_TO_FP32, INPUT_PRECISION, X_RESIDENT)
        if FOLD_NORMS:
            pieces_t = tl.load(pieces + piece_offsets)
            if CAST_TO_FP32:
                pieces_t = pieces_t.to(tl.float32)
            score = tl.reshape(tl.dot(ones, pieces_t, xe, input_precision=INPUT_PRECISION),
                               [BLOCK_N, STRIDED, GROUPS, RUN])
            pieces += BLOCK_K * NORM_PIECES
        else:
            xe = tl.reshape(xe, [BLOCK_N, STRIDED, GROUPS, RUN])
            score = tl.fma(xe, -2.0, tl.load(norms + strided)[None, :, :, :])  # explicit: FP fusion may change
            norms += BLOCK_K
        tile_min = tl.min(tl.min(score, axis=3), axis=1)
        improved = tile_min < part
        part = tl.where(improved, tile_min, part)
        if SAVE_TILES:
            part_idx = tl.where(improved, k0, part_idx)
            saved = tl.where(improved[:, None, :, None], score, saved)
        else:
            part_idx = tl.where(improved, k0 + first_column(score, tile_min, columns, BLOCK_K), part_idx)
        tile += BLOCK_K * row
    if SAVE_TILES:
        part_idx += first_column(saved, part, columns, BLOCK_K)
    # The groups' pairs: the smallest minimum, and the lowest index among the groups that reach it
    # (part is never NaN: a tile replaces it only when strictly smaller).
    best = tl.min(part, axis=1)
    best_idx = tl.min(tl.where(part == best[:, None], part_idx, 2**31 - 1), axis=1)
    finite = tl.abs(best) < float("inf")
    return tl.where(finite, best, float("inf")), tl.where(finite, best_idx, 0)


@device_function
def first_column(score, group_min, columns, BLOCK_K: tl.constexpr):
    """(BLOCK_N, GROUPS) int32: in each column group of a (BLOCK_N, STRIDED, GROUPS, RUN) view of a score
    tile (``columns``, (1, STRIDED, GROUPS, RUN), numbers its columns), the lowest column whose score
    equals ``group_min`` (BLOCK_N, GROUPS); BLOCK_K where none does."""
    first = tl.where(score == group_min[:, None, :, None], columns, BLOCK_K)
    return tl.min(tl.min(first, axis=3), axis=1)
