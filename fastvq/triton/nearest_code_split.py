"""nearest_code's search split over code ranges, for batches too small to fill the GPU (issue 14, item 4).

The unsplit kernel (nearest_code.py) gives each program BLOCK_N rows and the whole codebook, so
N = 256 rows make 2-8 programs on an H200's 132 SMs whatever K is. The launcher comes here
instead when ``use_split`` says so: ceil(N / 32) (the row programs at the smallest row tile) is
at most half the SM count, K >= MIN_CODES and K < 2^31 - 128. Program (i, j) of a
(row blocks, code ranges) grid scores row block i against the j-th of S ranges of whole BLOCK_K
code tiles with the unsplit kernel's main loop (_argmin_walk.py), which gives a per-row (min score,
lowest index), and merges across ranges with a 64-bit atomic min on

    key = order(score) << 32 | index,   order(s) = bits(s) ^ (s < 0 ? 0x7FFFFFFF : 0) as int32

``order`` is the usual order-preserving map of float32 bits (bits ^ (sign ? 0xFFFFFFFF : 0x80000000)
as uint32) with the top bit flipped, so that signed int32, and so signed int64 keys, sort like the
scores; -0.0 is made +0.0 first, as tl.min treats them as equal. The smallest key is the smallest
score and, among equal scores, the lowest index: the unsplit walk's answer. Each range's minimum is
finite or (+inf, index 0) (argmin_walk's non-finite rule), so a row with no finite score gets index
0, as in the unsplit kernel. A min is commutative and
associative, so the merge does not depend on the order the programs run in: with the fixed
config of deterministic mode the result is bitwise reproducible, atomics notwithstanding.

S makes the grid at least PROGRAMS_PER_SM × SMs programs (``code_ranges``; N = 256, K = 65536 on
132 SMs: 264 programs at every config, each over 4 to 31 code tiles); the SM count is the device's,
or STAND_IN_SM_COUNT (an H100/H200) for CPU tensors (the interpreter, compile_check).

A second kernel finishes as the unsplit kernel's epilogue does (same arithmetic, see there): the
index from the key, the gathered row e_idx written as the quantized row, sqdist = ‖x − e_idx‖²
directly in float32 in the original frame, and the range check's first far x row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._chosen_rows import write_chosen_rows
from ._argmin_walk import argmin_walk
from ._jit import kernel, launch
# fixed_config and the walk: the unsplit kernel's, same main loop
from ._score_tile import centred_x_tile, fixed_config, ordered_score, prune_search_configs


# The dispatcher's rule (use_split) and the grid (code_ranges). MIN_CODES is a first guess, not
# measured: below it each of the many programs would walk too few tiles to pay for the second launch.
SMALLEST_BLOCK_N = 32
MIN_CODES = 2048
PROGRAMS_PER_SM = 2
STAND_IN_SM_COUNT = 132
MAX_KEY = 2**63 - 1
MAX_CODES = 2**31 - 1 - 128  # int32 code offsets in the walk, K padded to a multiple of 128
EPILOGUE_BLOCK_N = 64


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; STAND_IN_SM_COUNT for any other (CPU tensors)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return STAND_IN_SM_COUNT


def use_split(num_rows: int, num_codes: int, sms: int) -> bool:
    """Split over codes when even 32-row programs would leave half the SMs idle, and K is large
    enough to share out (and small enough for int32 code offsets)."""
    return 2 * triton.cdiv(num_rows, SMALLEST_BLOCK_N) <= sms and MIN_CODES <= num_codes <= MAX_CODES


def code_ranges(num_rows: int, num_codes: int, sms: int, block_n: int, block_k: int) -> int:
    """S, the code ranges per row block: enough for PROGRAMS_PER_SM × sms programs, at most one per tile."""
    row_blocks = triton.cdiv(num_rows, block_n)
    return max(1, min(triton.cdiv(num_codes, block_k), triton.cdiv(PROGRAMS_PER_SM * sms, row_blocks)))


_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (32, 64, 4, 3),
        (32, 128, 4, 3),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
    ]
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)


# The unsplit kernel's key; the grid also follows the SM count, fixed per device.
_AUTOTUNE_KEY = ["K", "d", "N_BUCKET", "CAST_TO_FP32", "INPUT_PRECISION", "BLOCK_D", "X_RESIDENT", "FOLD_NORMS"]


# restore_value: the autotuner's trial runs would otherwise leave their keys in the buffer.
@kernel(configs=_CONFIGS, interpreter_config=_INTERPRETER_CONFIG, key=_AUTOTUNE_KEY, fixed_config=fixed_config,
        prune=prune_search_configs, do_not_specialize=["N_BUCKET"], restore_value=["keys_ptr"])
def _split_search_kernel(
    x_ptr, centre_ptr, codes_ptr, code_norms_ptr, keys_ptr,
    N, K, d, N_BUCKET,
    stride_xn, stride_xd,
    CAST_TO_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    X_RESIDENT: tl.constexpr,
    FOLD_NORMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    x_rows = x_ptr + rows[:, None] * stride_xn
    lanes_d = tl.arange(0, BLOCK_D).to(tl.int64)
    # Range j of S: tiles [j·T/S, (j+1)·T/S) of the T code tiles, none empty while S <= T.
    tiles = tl.cdiv(K, BLOCK_K)  # a constant when K = 1 (Triton specialises it), hence no .to here
    ranges = tl.num_programs(1)
    j = tl.program_id(1).to(tl.int64)
    first = (j * tiles // ranges * BLOCK_K).to(tl.int32)  # K < 2^31 (use_split)
    end = ((j + 1) * tiles // ranges * BLOCK_K).to(tl.int32)

    x_tile = centred_x_tile(x_rows, stride_xd, row_mask, centre_ptr, lanes_d, d, codes_ptr,
                            CAST_TO_FP32, X_RESIDENT)
    best, best_idx = argmin_walk(x_tile, x_rows, stride_xd, row_mask, centre_ptr, codes_ptr, code_norms_ptr,
                                 first, end, lanes_d, d, BLOCK_N, BLOCK_K, BLOCK_D,
                                 CAST_TO_FP32, INPUT_PRECISION, X_RESIDENT, FOLD_NORMS)

    key = (ordered_score(best).to(tl.int64) << 32) | best_idx.to(tl.int64)
    tl.atomic_min(keys_ptr + rows, key, mask=row_mask, sem="relaxed")


@kernel()
def _split_epilogue_kernel(
    x_ptr, centre_ptr, codebook_ptr, keys_ptr,
    indices_ptr, sqdist_ptr, quantized_ptr, range_check_ptr,
    N, d,
    stride_xn, stride_xd, stride_cn, stride_cd,
    WRITE_QUANTIZED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    x_rows = x_ptr + rows[:, None] * stride_xn
    best_idx = tl.load(keys_ptr + rows, mask=row_mask, other=0) & 0xFFFFFFFF
    write_chosen_rows(x_rows, stride_xd, rows, row_mask, best_idx, centre_ptr, codebook_ptr, stride_cn, stride_cd,
                      indices_ptr, sqdist_ptr, quantized_ptr, range_check_ptr, N, d, BLOCK_N, WRITE_QUANTIZED)


def split_search(x: Tensor, centre: Tensor, codes: Tensor, code_norms: Tensor, *, cast_to_fp32: bool,
                 input_precision: str, block_d: int, resident: bool, fold_norms: bool) -> Tensor:
    """int64 (N,) keys, order(min score) << 32 | lowest index, of x against the centred codes
    (nearest_code.centred_codebook), over a (row blocks, code ranges) grid. Any rows of ``codes`` past
    the codebook's must score +inf (norm +inf), as they then do for every x."""
    num_rows, dim = x.shape
    num_codes = codes.shape[0]
    keys = torch.full((num_rows,), MAX_KEY, dtype=torch.int64, device=x.device)
    sms = sm_count(x.device)

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_N"]),
                code_ranges(num_rows, num_codes, sms, meta["BLOCK_N"], meta["BLOCK_K"]))

    launch(
        _split_search_kernel, grid,
        x, centre, codes, code_norms, keys,
        num_rows, num_codes, dim, (num_rows - 1).bit_length(),
        x.stride(0), x.stride(1),
        CAST_TO_FP32=cast_to_fp32, INPUT_PRECISION=input_precision, BLOCK_D=block_d, X_RESIDENT=resident,
        FOLD_NORMS=fold_norms,
    )
    return keys


def split_epilogue(x: Tensor, centre: Tensor, codebook: Tensor, keys: Tensor, indices: Tensor, sqdist: Tensor,
                   quantized: Tensor, range_check: Tensor, write_quantized: bool) -> None:
    """From the keys, fill indices, sqdist, quantized (when write_quantized) and range_check[1]."""
    num_rows, dim = x.shape
    launch(
        _split_epilogue_kernel, (triton.cdiv(num_rows, EPILOGUE_BLOCK_N),),
        x, centre, codebook, keys, indices, sqdist, quantized, range_check,
        num_rows, dim,
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
        WRITE_QUANTIZED=write_quantized, BLOCK_N=EPILOGUE_BLOCK_N, num_warps=4,
    )


def nearest_code_split(x: Tensor, codebook: Tensor, centre: Tensor, codes: Tensor, code_norms: Tensor,
                       indices: Tensor, sqdist: Tensor, quantized: Tensor, range_check: Tensor, *,
                       write_quantized: bool, cast_to_fp32: bool, input_precision: str, block_d: int,
                       resident: bool, fold_norms: bool) -> None:
    """What _nearest_code_kernel writes (indices, sqdist, quantized, range_check[1]), in two launches."""
    keys = split_search(x, centre, codes, code_norms, cast_to_fp32=cast_to_fp32, input_precision=input_precision,
                        block_d=block_d, resident=resident, fold_norms=fold_norms)
    split_epilogue(x, centre, codebook, keys, indices, sqdist, quantized, range_check, write_quantized)
