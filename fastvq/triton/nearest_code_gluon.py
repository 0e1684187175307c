"""nearest_code's bf16 search as a hand-scheduled Gluon kernel for Hopper (sm_90): the next code tile's
wgmma runs while the current tile is folded (issue 14, item 3's overlap).

Triton 3.9 waits for every wgmma group at once in the Triton kernel (nearest_code.py; README), and its
warp specialisation does not apply on Hopper. Gluon states the schedule itself. Per program, BLOCK_N rows of
x − c sit in shared memory; the codes stream through STAGES shared-memory buffers by TMA; per code tile t

    issue wgmma(x', −e'_t) and wgmma(ones, pieces_t) onto one accumulator   (async, two groups)
    wait until only those two groups are in flight                          (tile t − 1 is done)
    refill tile t − 1's buffers with tile t − 1 + STAGES                   (TMA)
    fold tile t − 1's scores into the running minimum                        (CUDA cores, beside the wgmma)

The arithmetic is the Triton kernel's for bf16 (_argmin_walk.py): codes negated beside three bf16 pieces
per code that sum exactly to ‖e'‖²/2, so the accumulator holds score/2 = ‖e'‖²/2 − x'·e' and the fold is a
plain running minimum per row, the tile that gave it, and that tile's scores; the lowest column reaching
the minimum is found once, after the loop. Ties go to the lowest index, non-finite rows to index 0.

It writes the split search's keys (nearest_code_split.py: order(score) << 32 | index, merged by an atomic
min), so one kernel serves both grids, (row blocks, 1) and (row blocks, code ranges) for small N, and the
split epilogue finishes (gathered rows, sqdist, range check).

Scope: x and codebook bfloat16, d <= 64 (BLOCK_D in 16, 32, 64: one 128-byte swizzled TMA box per code
row), compute capability 9.x. Opt-in (fastvq.triton.set_search_kernel("gluon")): Gluon kernels do not run
under the interpreter, so this one is checked here only by compile_check; the device check runs it
against the reference on a GPU before it can become the default.
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import nearest_code_split as split
from ._argmin_walk import NORM_PIECES
from ._jit import launch_gluon

MAX_D = 64
# One config, chosen by reading registers and SASS (compile_check), not by timing: none was possible
# without a GPU. 64 rows fill one warpgroup's wgmma; three live score tiles (in flight, folded, saved)
# take 3 × 64 registers per thread at 128 codes (231 in all, two programs per SM), and 128 codes halve
# the per-tile work per score element against 64 (3.5 against 5.1 SASS instructions).
BLOCK_N, BLOCK_K, STAGES, NUM_WARPS = 64, 128, 3, 4
TILES_PER_STEP = 2  # the main loop's step: two tiles, one per accumulator


@gluon.constexpr_function
def x_load_layout(block_d, num_warps):
    """A blocked layout for the (BLOCK_N, BLOCK_D) x tile: 8 contiguous bf16 (16 bytes) per thread."""
    columns = block_d // 8
    return gl.BlockedLayout([1, 8], [32 // columns, columns], [num_warps, 1], [1, 0])


@gluon.jit
def _load_code_tile(codes_desc, pieces_desc, codes_smem, pieces_smem, ready, stage, tile, predicate):
    BLOCK_K: gl.constexpr = codes_desc.block_type.shape[0]
    bar = ready.index(stage)
    mbarrier.expect(bar, codes_desc.block_type.nbytes + pieces_desc.block_type.nbytes, pred=predicate)
    tma.async_load(codes_desc, [tile * BLOCK_K, 0], bar, codes_smem.index(stage), pred=predicate)
    tma.async_load(pieces_desc, [tile * BLOCK_K, 0], bar, pieces_smem.index(stage), pred=predicate)


@gluon.jit
def _issue_tile_scores(x_smem, ones_smem, codes_smem, pieces_smem, stage, zero):
    """Start score/2 of the program's rows against the tile in ``stage``: x'·(−e') then + ‖e'‖²/2."""
    acc = warpgroup_mma(x_smem, codes_smem.index(stage).permute((1, 0)), zero, use_acc=False, is_async=True)
    return warpgroup_mma(ones_smem, pieces_smem.index(stage).permute((1, 0)), acc, is_async=True)


@gluon.jit
def _next_tile(x_smem, ones_smem, codes_smem, pieces_smem, ready, t, zero):
    """Wait for the range's tile t to land, then start its scores."""
    STAGES: gl.constexpr = codes_smem.shape[0]
    slot = t % STAGES
    mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
    return _issue_tile_scores(x_smem, ones_smem, codes_smem, pieces_smem, slot, zero)


@gluon.jit
def _finish_tile(scores, codes_desc, pieces_desc, codes_smem, pieces_smem, ready, first, t, count, best, best_tile,
                 saved):
    """With the next tile's two wgmma groups issued behind them, wait for tile t's, refill its buffers with
    tile t + STAGES, and fold it."""
    STAGES: gl.constexpr = codes_smem.shape[0]
    score = warpgroup_mma_wait(num_outstanding=2, deps=(scores, ))
    _load_code_tile(codes_desc, pieces_desc, codes_smem, pieces_smem, ready, t % STAGES, first + t + STAGES,
                    t + STAGES < count)
    return _fold(score, first + t, best, best_tile, saved)


@gluon.jit
def _fold(score, tile, best, best_tile, saved):
    tile_min = gl.min(score, axis=1)
    improved = tile_min < best  # strictly: the first tile reaching the minimum keeps it; a NaN row never improves
    best = gl.where(improved, tile_min, best)
    best_tile = gl.where(improved, tile, best_tile)
    saved = gl.where(gl.expand_dims(improved, 1), score, saved)
    return best, best_tile, saved


@gluon.jit
def _nearest_code_keys_kernel(x_ptr, centre_ptr, codes_desc, pieces_desc, keys_ptr,
                              N, d, stride_xn, stride_xd, num_tiles,
                              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_K: gl.constexpr = codes_desc.block_type.shape[0]
    BLOCK_D: gl.constexpr = codes_desc.block_type.shape[1]
    PIECES: gl.constexpr = pieces_desc.block_type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_K, 16])
    row_of_mma: gl.constexpr = gl.SliceLayout(1, mma)
    column_of_mma: gl.constexpr = gl.SliceLayout(0, mma)
    loads: gl.constexpr = x_load_layout(BLOCK_D, num_warps)

    # The program's rows of x − c, rounded to bf16 as the Triton kernel rounds them, and the ones operand.
    first_row = gl.program_id(0).to(gl.int64) * BLOCK_N
    rows = first_row + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, loads))
    columns = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, loads)).to(gl.int64)  # int64: column × stride
    in_x = gl.expand_dims(rows < N, 1) & gl.expand_dims(columns < d, 0)
    x = gl.load(x_ptr + gl.expand_dims(rows * stride_xn, 1) + gl.expand_dims(columns * stride_xd, 0),
                mask=in_x, other=0.0)
    centre = gl.load(centre_ptr + columns, mask=columns < d, other=0.0)
    x = (x.to(gl.float32) - gl.expand_dims(centre, 0)).to(gl.bfloat16)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, BLOCK_D],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_D], gl.bfloat16), x)
    ones = gl.full([BLOCK_N, PIECES], 1.0, gl.bfloat16, x_load_layout(PIECES, num_warps))
    ones_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, PIECES],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_N, PIECES], gl.bfloat16), ones)
    fence_async_shared()  # the wgmma (async proxy) reads what these threads stored

    codes_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_K, BLOCK_D], codes_desc.layout)
    pieces_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_K, PIECES], pieces_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=1)

    # Code range j of S: tiles [j·T/S, (j+1)·T/S), never empty while S <= T (split.code_ranges).
    ranges = gl.num_programs(1)
    j = gl.program_id(1).to(gl.int64)  # int64: j·T can pass 2^31
    first = (j * num_tiles // ranges).to(gl.int32)
    count = ((j + 1) * num_tiles // ranges).to(gl.int32) - first
    for stage in gl.static_range(STAGES):
        _load_code_tile(codes_desc, pieces_desc, codes_smem, pieces_smem, ready, stage, first + stage,
                        stage < count)

    zero = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, mma)
    best = gl.full([BLOCK_N], float("inf"), gl.float32, row_of_mma)
    best_tile = gl.zeros([BLOCK_N], gl.int32, row_of_mma)
    saved = gl.full([BLOCK_N, BLOCK_K], float("inf"), gl.float32, mma)
    # Two accumulators take turns, two tiles a step, so neither is copied while a wgmma writes it (a
    # loop-carried copy of an in-flight accumulator makes ptxas wait on every wgmma).
    mbarrier.wait(ready.index(0), 0)
    scores_a = _issue_tile_scores(x_smem, ones_smem, codes_smem, pieces_smem, 0, zero)
    t = 1
    for _ in range(0, (count - 1) // 2):
        scores_b = _next_tile(x_smem, ones_smem, codes_smem, pieces_smem, ready, t, zero)
        best, best_tile, saved = _finish_tile(scores_a, codes_desc, pieces_desc, codes_smem, pieces_smem, ready,
                                              first, t - 1, count, best, best_tile, saved)
        scores_a = _next_tile(x_smem, ones_smem, codes_smem, pieces_smem, ready, t + 1, zero)
        best, best_tile, saved = _finish_tile(scores_b, codes_desc, pieces_desc, codes_smem, pieces_smem, ready,
                                              first, t, count, best, best_tile, saved)
        t += 2
    if t < count:  # an even count: tile t is the last
        scores_b = _next_tile(x_smem, ones_smem, codes_smem, pieces_smem, ready, t, zero)
        best, best_tile, saved = _finish_tile(scores_a, codes_desc, pieces_desc, codes_smem, pieces_smem, ready,
                                              first, t - 1, count, best, best_tile, saved)
        score = warpgroup_mma_wait(num_outstanding=0, deps=(scores_b, ))
        best, best_tile, saved = _fold(score, first + t, best, best_tile, saved)
    else:
        score = warpgroup_mma_wait(num_outstanding=0, deps=(scores_a, ))
        best, best_tile, saved = _fold(score, first + t - 1, best, best_tile, saved)
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(stage))

    # The lowest column of the saved tile reaching the minimum; then the split search's key.
    lanes = gl.arange(0, BLOCK_K, layout=column_of_mma)
    reaching = gl.where(saved == gl.expand_dims(best, 1), gl.expand_dims(lanes, 0), BLOCK_K)
    best_idx = best_tile * BLOCK_K + gl.min(reaching, axis=1)
    finite = gl.abs(best) < float("inf")
    best = gl.where(finite, best, float("inf"))
    best_idx = gl.where(finite, best_idx, 0)
    # _score_tile.ordered_score, in Gluon (a Gluon kernel cannot call Triton device functions)
    best = gl.where(best == 0.0, 0.0, best)  # -0.0 -> +0.0
    bits = best.to(gl.int32, bitcast=True)
    order = gl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (order.to(gl.int64) << 32) | best_idx.to(gl.int64)
    out_rows = first_row + gl.arange(0, BLOCK_N, layout=row_of_mma)
    gl.atomic_min(keys_ptr + out_rows, key, mask=out_rows < N, sem="relaxed")


def supports(x: Tensor, codebook: Tensor) -> str | None:
    """Why this kernel cannot search x against codebook (None: it can)."""
    if x.dtype != torch.bfloat16 or codebook.dtype != torch.bfloat16:
        return f"x and codebook must both be bfloat16 (got {x.dtype} and {codebook.dtype})"
    if x.shape[1] > MAX_D:
        return f"d = {x.shape[1]} > {MAX_D}"
    if x.device.type != "cuda":
        return "Gluon kernels need a CUDA device (no interpreter)"
    major = torch.cuda.get_device_capability(x.device)[0]
    if major != 9:
        return f"wgmma needs compute capability 9.x (got {major}.x)"
    if codebook.shape[0] > split.MAX_CODES:
        return f"K = {codebook.shape[0]} > {split.MAX_CODES}"
    return None


def block_d_for(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def code_descriptors(codes: Tensor, pieces: Tensor) -> tuple[TensorDescriptor, TensorDescriptor]:
    """TMA descriptors of nearest_code.centred_codebook's bf16 output (fold_norms): the negated codes padded
    with zero columns to BLOCK_D (16-byte rows, as TMA needs), and the norm pieces."""
    block_d = block_d_for(codes.shape[1])
    padded = torch.nn.functional.pad(codes, (0, block_d - codes.shape[1])).contiguous()
    codes_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_K, block_d], gl.bfloat16)
    pieces_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_K, NORM_PIECES.value], gl.bfloat16)
    return (TensorDescriptor(padded, list(padded.shape), list(padded.stride()), [BLOCK_K, block_d], codes_layout),
            TensorDescriptor(pieces, list(pieces.shape), list(pieces.stride()), [BLOCK_K, NORM_PIECES.value],
                             pieces_layout))


def search_keys(x: Tensor, centre: Tensor, codes: Tensor, pieces: Tensor, num_codes: int, sms: int) -> Tensor:
    """int64 (N,) keys (nearest_code_split.split_search's) of bf16 x against the centred, negated codes and
    their norm pieces (nearest_code.centred_codebook with fold_norms; K' rows, a multiple of BLOCK_K, of which
    the first num_codes are the codebook's); split over code ranges when nearest_code_split.use_split says."""
    num_rows = x.shape[0]
    keys = torch.full((num_rows,), split.MAX_KEY, dtype=torch.int64, device=x.device)
    codes_desc, pieces_desc = code_descriptors(codes, pieces)
    ranges = 1
    if split.use_split(num_rows, num_codes, sms):
        ranges = split.code_ranges(num_rows, num_codes, sms, BLOCK_N, BLOCK_K)
    launch_gluon(_nearest_code_keys_kernel, (triton.cdiv(num_rows, BLOCK_N), ranges),
                 x, centre, codes_desc, pieces_desc, keys,
                 num_rows, x.shape[1], x.stride(0), x.stride(1), codes.shape[0] // BLOCK_K,
                 BLOCK_N=BLOCK_N, STAGES=STAGES, num_warps=NUM_WARPS)
    return keys
