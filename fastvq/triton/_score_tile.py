"""The code-tile step the Triton searches share (nearest_code.py, nearest_codes.py, nearest_code_split.py):
the centred x tile a program keeps, one (BLOCK_N, BLOCK_K) tile of x'·e' (code_tile_dot), and of scores
‖e'_k‖² − 2 x'_i·e'_k in the centred frame with the non-finite rule applied (score_tile; x' = x − c,
e' = e − c; nearest_code.py's docstring has the derivation). The kernels differ in what they fold the
scores into: a running argmin (_argmin_walk.py, which adds ‖e'‖²/2 onto code_tile_dot's accumulator for
bf16), or a sorted top-k list (nearest_codes.py). The two argmin kernels also share their deterministic
configs and the autotune pruning here (prune_search_configs).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._jit import device_function

# Deterministic mode (numerics.deterministic()) runs one fixed config of a search instead of the autotuner's
# pick, so the result cannot depend on timing noise: 64 rows × 64 codes, 4 warps, 3 stages on tensor cores,
# and 32 rows × 64 codes for float32 operands (fastvq.triton.compile_check: no spills on sm_80/sm_90). The
# unsplit and the split nearest_code share it, as they share the main loop.
DETERMINISTIC_CONFIG = triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3)
DETERMINISTIC_CONFIG_FP32 = triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3)


# A resident x tile wider than 128 columns (nearest_code, d <= 256 on tensor cores) fits beside the rest
# only at 64 codes and either 32 rows on 4 warps or 128 rows on 8 warps at 3 stages (compile_check over
# every config, sm_80 and sm_90, bf16 d=256 and fp16 d=160/200: 64 rows on 4 warps spill at fp16 d=200,
# 4 stages or 128 codes pass sm_80's shared memory); deterministic mode runs 32 rows.
DETERMINISTIC_CONFIG_WIDE = triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3)
WIDE_X_BLOCK_D = 128  # BLOCK_D above this is a wide x tile


def fixed_config(kwargs: dict) -> triton.Config:
    if kwargs["CAST_TO_FP32"]:
        return DETERMINISTIC_CONFIG_FP32
    return DETERMINISTIC_CONFIG_WIDE if kwargs["BLOCK_D"] > WIDE_X_BLOCK_D else DETERMINISTIC_CONFIG


def wide_x_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """Of ``configs``, those that hold a wide resident x tile (above), 128-row ones at 3 stages."""
    kept = []
    for c in configs:
        if c.kwargs["BLOCK_K"] == 64 and c.kwargs["BLOCK_N"] <= 32 and c.num_warps == 4:
            kept.append(c)
        elif c.kwargs["BLOCK_K"] == 64 and c.kwargs["BLOCK_N"] == 128 and c.num_warps == 8:
            kept.append(triton.Config(c.kwargs, num_warps=8, num_stages=min(c.num_stages, 3)))
    return kept


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
    row = code_row_length(d, CAST_TO_FP32, INPUT_PRECISION, X_RESIDENT)
    codes_t = codes_ptr + codes[None, :] * row  # tiles loaded transposed, (BLOCK_D, BLOCK_K), for x @ eᵀ
    xe = code_tile_dot(x_tile, x_rows, stride_xd, row_mask, centre_ptr, codes_ptr, codes_t, code_mask, lanes_d, d,
                       None, BLOCK_N, BLOCK_K, BLOCK_D, CAST_TO_FP32, INPUT_PRECISION, X_RESIDENT)
    norms = tl.load(code_norms_ptr + codes, mask=code_mask, other=0.0)
    score = tl.fma(xe, -2.0, norms[None, :])  # explicit: Triton's default FP fusion may change
    usable = (score == score) & (tl.abs(score) < float("inf")) & code_mask[None, :]
    return tl.where(usable, score, float("inf"))


@device_function
def code_tile_dot(x_tile, x_rows, stride_xd, row_mask, centre_ptr, codes_ptr, codes_t, code_mask, lanes_d, d, acc,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                  CAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, X_RESIDENT: tl.constexpr):
    """(BLOCK_N, BLOCK_K) float32 x'·e' of the program's rows and one tile of the centred codebook:
    ``codes_t`` (1, BLOCK_K) points at the tile's code rows (code_row_length entries each), ``code_mask``
    (BLOCK_K,) says which exist, or is None when all do (nearest_code's tiles of the padded codebook). The dot
    adds onto ``acc`` (BLOCK_N, BLOCK_K) float32 when it is not None.

    With x resident at "tf32x3" (float32 operands) each code row holds e's TF32 split, E then ε
    (nearest_code.tf32_split_codes), and the dot is tf32x3_dot's; d-slices keep Triton's own "tf32x3" (the
    explicit split there took fp32 d=130 from 31 to 149 SASS per element)."""
    SPLIT: tl.constexpr = CAST_TO_FP32 and INPUT_PRECISION == "tf32x3" and X_RESIDENT
    if X_RESIDENT:  # no inner loop, so Triton software-pipelines the caller's (innermost) loop's loads
        e_mask = lanes_d[:, None] < d if code_mask is None else (lanes_d[:, None] < d) & code_mask[None, :]
        e_t = tl.load(codes_t + lanes_d[:, None], mask=e_mask, other=0.0)
        if CAST_TO_FP32:
            e_t = e_t.to(tl.float32)
        if SPLIT:
            xe = tf32x3_dot(x_tile, e_t, tl.load(codes_t + d + lanes_d[:, None], mask=e_mask, other=0.0))
            if acc is not None:
                xe += acc
        else:
            xe = tl.dot(x_tile, e_t, acc, input_precision=INPUT_PRECISION)
    else:
        xe = tl.zeros([BLOCK_N, BLOCK_K], tl.float32) if acc is None else acc
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + lanes_d
            e_mask = cols[:, None] < d if code_mask is None else (cols[:, None] < d) & code_mask[None, :]
            e_t = tl.load(codes_t + cols[:, None], mask=e_mask, other=0.0)
            if CAST_TO_FP32:
                e_t = e_t.to(tl.float32)
            x_t = centred_x_slice(x_rows, stride_xd, row_mask, centre_ptr, cols, d, codes_ptr, CAST_TO_FP32)
            xe = tl.dot(x_t, e_t, xe, input_precision=INPUT_PRECISION)
    return xe


@device_function
def code_row_length(d, CAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, X_RESIDENT: tl.constexpr):
    """Entries per row of the centred codes: d, or 2d for the TF32 split (E then ε) with x resident at
    "tf32x3" (code_tile_dot; the launchers decide the same in nearest_code.splits_tf32)."""
    if CAST_TO_FP32 and INPUT_PRECISION == "tf32x3" and X_RESIDENT:
        return 2 * d
    else:
        return d


@device_function
def tf32_rounded(v):
    """float32 ``v`` rounded to TF32 (11 significant bits), to nearest with ties away from zero, as PTX's
    cvt.rna.tf32.f32 (bits are sign-magnitude: adding half a unit rounds |v|). Not for |v| near FLT_MAX
    (the range check keeps the searches' operands far below); a NaN stays non-finite in v − tf32_rounded(v)."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)


@device_function
def tf32x3_dot(x, e_big, e_small):
    """x·e for float32 x (BLOCK_N, BLOCK_D) and e = e_big + e_small (BLOCK_D, BLOCK_K), both TF32 (the host
    split the codes once, tf32_split_codes): three TF32 tensor-core dots, the two small ones from zero, then
    the big one onto them; x splits here as X + ξ. reference.nearest_code_slack("tf32x3") derives the bound.
    Splitting the codes once per call instead of per tile in every program (Triton's own "tf32x3") takes
    fp32 d=64 from 31.8 to 19.5 SASS per score element on sm_90."""
    x_big = tf32_rounded(x)
    x_small = tf32_rounded(x - x_big)
    xe = tl.dot(x_small, e_big, input_precision="tf32")
    xe = tl.dot(x_big, e_small, xe, input_precision="tf32")
    return tl.dot(x_big, e_big, xe, input_precision="tf32")


@device_function
def ordered_score(score):
    """The signed int32 whose order is the float32 scores' order (−0 made +0 first, so equal scores are
    equal keys): the high half of the searches' (score, index) keys, in the split merge
    (nearest_code_split.py) and the top-k lists (nearest_codes.py)."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def prune_search_configs(configs, named_args, **kwargs):
    """The argmin searches' autotune configs (nearest_code.py, nearest_code_split.py) that do not spill on
    this launch's path (compile_check --all, sm_80/sm_90): float32 operands only at 32 rows x 64 codes (the
    FMA dot at "ieee"; at "tf32x3" every larger tile spills on sm_80), and not 32 x 32 on "ieee"
    d-slices (8 B on sm_90); a wide resident x (d > 128) as wide_x_configs says; bf16/fp16 d-slices only
    at 64 codes and at most 32 accumulators per thread."""
    def flag(name):
        return kwargs.get(name, named_args.get(name))

    def shape(c):
        return c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]

    if flag("CAST_TO_FP32"):
        smallest_spills = not flag("X_RESIDENT") and flag("INPUT_PRECISION") == "ieee"
        return [c for c in configs if shape(c) in ((32, 64), (32, 32)) and not (smallest_spills and shape(c)[1] < 64)]
    if flag("BLOCK_D") > WIDE_X_BLOCK_D:
        return wide_x_configs(configs)
    if not flag("X_RESIDENT"):
        return [c for c in configs if shape(c)[1] <= 64 and shape(c)[0] * shape(c)[1] <= 32 * 32 * c.num_warps]
    return configs

