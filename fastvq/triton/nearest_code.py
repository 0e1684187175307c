"""nearest_code in Triton: the search fused with the gather, registered as ``fastvq::triton_nearest_code``.

The search is a GEMM with a min-epilogue, in a centred frame: distances are translation
invariant, and ‖e‖² − 2x·e cancels far from the origin (issue 12, finding 5), so with
c = numerics.search_centre(codebook) the search runs on x' = x − c and e' = e − c. Once per
call (O(K·d)) the launcher forms the centred codes e' and ‖e'_k‖² (centred_codebook); each
program owns BLOCK_N rows of x, subtracts c as it loads them, and walks e' in BLOCK_K-row tiles;
per tile ``tl.dot`` gives x'·e', and

    score(i, k) = ‖e'_k‖² − 2 x'_i·e'_k    (= ‖x_i − e_k‖² − ‖x'_i‖², same argmin)

is folded into a running argmin held in registers. No N×K buffer exists.

Non-finite rule (fastvq/reference.py): a NaN or ±inf distance counts as +inf, so a non-finite
code never wins while a finite one exists, and a row of x with a NaN/Inf gets index 0. The main
loop applies no mask for it: centred_codebook makes a code with a NaN/Inf a zero row with norm
+inf, and pads the codes to whole tiles with such rows, so against a finite row of x every score
is finite or +inf (finite within the range check below) and never NaN. A row of x with a NaN/Inf
scores NaN or ±inf against every code, so its running minimum ends non-finite, as does that of a
row with no finite score at all; after the loop every row whose minimum is not finite gets index 0.

The fold (fastvq/triton/_argmin_walk.py, shared with the split search), lean because it runs per
score element. The kernel views a score tile as
(BLOCK_N, STRIDED, GROUPS, RUN), column a·GROUPS·RUN + g·RUN + r at [a, g, r], with a column group
g being what one thread holds of a row (the tensor cores' accumulator: 4 lanes of a quad, each with
pairs of columns 8 apart; the FMA dot: a pair), so the work per group stays in one thread. Per
(row, group) it keeps the running minimum; a tile replaces it only when strictly smaller, so it is
the first tile's. With resident x on tensor cores it also keeps the group's scores of that tile and
finds the lowest column achieving the minimum once, after the loop: per score element an FFMA, an
FMNMX and an FSEL, and for bf16 no FFMA, as the tensor cores add ‖e'‖²/2 and return half the
score (_argmin_walk.py's docstring). On the FMA dot and the d-slices, short of registers, it finds
that column at once in each improving tile. After the loop the groups' (minimum, lowest index) pairs combine to
the smallest score and, among equal scores, the lowest index: the reference's tie rule, exactly.

The epilogue gathers e_idx for each row from the original codebook, writes it as the quantized
row and computes sqdist = ‖x − e_idx‖² directly in the original frame, in float32, as the
contract says. It also records the first finite row with ‖x − c‖² beyond FLT_MAX/8, where a
float32 search could overflow (the launcher's range check; fastvq/backends/search_range.py). (When x and the
codebook differ in dtype the launcher does the gather with torch instead, so the
rounding to x's dtype is torch's.)

Precision: bf16/fp16 inputs of one dtype go to tensor cores with fp32 accumulation, on x' and e'
rounded to that dtype (exact when the data sit on a grid no finer than the dtype's at the
centre, e.g. integers; otherwise one rounding of the small centred values); float32 (and
mixed-dtype) inputs are searched on float32 operands at fastvq.triton.fp32_precision(): by default
"tf32x3", Triton's 3xTF32 split on tensor cores (reference.nearest_code_slack states its bound),
else "ieee" (FMA) or "tf32" (set_fp32_precision / FASTVQ_TRITON_FP32_PRECISION).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ..numerics import first_out_of_range_code, search_centre
from . import nearest_code_split as split
from ._chosen_rows import write_chosen_rows
from ._argmin_walk import NORM_PIECES, argmin_walk
from ._jit import (MAX_BLOCK_D, MAX_RESIDENT_D, block_d_for, interpreting, kernel, launch, search_kernel,
                   search_precision)
from ._score_tile import centred_x_tile, fixed_config, prune_search_configs

try:  # Gluon (triton.experimental) comes with Triton >= 3.5; without it the Triton kernel runs
    from . import nearest_code_gluon
    _GLUON_IMPORT_ERROR = None
except ImportError as error:
    nearest_code_gluon, _GLUON_IMPORT_ERROR = None, error


_TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)


_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (32, 32, 4, 2),
        (32, 64, 4, 2),
        (32, 64, 4, 3),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
        (128, 64, 4, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 3),
        (256, 64, 8, 3),
    ]
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)
# Pruned per launch by _score_tile.prune_search_configs (no spills). Tuned once per (K, d, N_BUCKET = ceil(log2 N), every constexpr that changes the code) and the
# tensors' dtypes (Triton adds those): the best tile for N = 256 is not the best for N = 65536.
_AUTOTUNE_KEY = ["K", "d", "N_BUCKET", "WRITE_QUANTIZED", "CAST_TO_FP32", "INPUT_PRECISION", "BLOCK_D", "X_RESIDENT",
                 "FOLD_NORMS"]


@kernel(configs=_CONFIGS, interpreter_config=_INTERPRETER_CONFIG, key=_AUTOTUNE_KEY,
        fixed_config=fixed_config, prune=prune_search_configs, do_not_specialize=["N_BUCKET"])
def _nearest_code_kernel(
    x_ptr, centre_ptr, codes_ptr, code_norms_ptr, codebook_ptr,
    indices_ptr, sqdist_ptr, quantized_ptr, range_check_ptr,
    N, K, d, N_BUCKET,
    stride_xn, stride_xd, stride_cn, stride_cd,
    WRITE_QUANTIZED: tl.constexpr,
    CAST_TO_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    X_RESIDENT: tl.constexpr,
    FOLD_NORMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: no overflow for any N
    row_mask = rows < N
    x_rows = x_ptr + rows[:, None] * stride_xn
    lanes_d = tl.arange(0, BLOCK_D).to(tl.int64)  # int64: a column times a large stride does not overflow

    x_tile = centred_x_tile(x_rows, stride_xd, row_mask, centre_ptr, lanes_d, d, codes_ptr,
                            CAST_TO_FP32, X_RESIDENT)
    # Whole tiles: centred_codebook pads the codes to a multiple of every BLOCK_K.
    _, best_idx = argmin_walk(x_tile, x_rows, stride_xd, row_mask, centre_ptr, codes_ptr, code_norms_ptr,
                              0, tl.cdiv(K, BLOCK_K) * BLOCK_K, lanes_d, d, BLOCK_N, BLOCK_K, BLOCK_D,
                              CAST_TO_FP32, INPUT_PRECISION, X_RESIDENT, FOLD_NORMS)

    write_chosen_rows(x_rows, stride_xd, rows, row_mask, best_idx.to(tl.int64), centre_ptr, codebook_ptr,
                      stride_cn, stride_cd, indices_ptr, sqdist_ptr, quantized_ptr, range_check_ptr, N, d, BLOCK_N,
                      WRITE_QUANTIZED)


# The centred codes' rows are a multiple of this, and so of every BLOCK_K: whole tiles, no mask.
CODE_ROWS_MULTIPLE = 128


def centred_codebook(codebook: Tensor, dtype: torch.dtype, fold_norms: bool = False,
                     tf32_split: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What every Triton search needs of the codebook, once per call (O(K·d)): the search centre c
    (d,) float32 (numerics.search_centre); the centred codes e − c as a contiguous (K', d) tensor of
    ``dtype`` (the tiles the search loads, so its inner loop stays a plain load and dot), K' being K
    rounded up to a multiple of CODE_ROWS_MULTIPLE; their squared norms (K',) float32 in that
    rounding; and the range check's first entry (numerics). A code with a NaN or ±inf entry, and
    each padding row past K, is a zero row with norm +inf: it scores +inf against any finite x.

    With ``fold_norms`` (bf16 codes; _argmin_walk.py) the codes are negated, c − e, and the norms come
    as norm_pieces of them. With ``tf32_split`` each row holds the codes' TF32 split instead
    (tf32_split_codes), (K', 2d): for float32 operands at "tf32x3" with x resident (_score_tile.code_tile_dot)."""
    centre = search_centre(codebook)
    num_codes, dim = codebook.shape
    padded = -(-num_codes // CODE_ROWS_MULTIPLE) * CODE_ROWS_MULTIPLE
    finite = torch.isfinite(codebook).all(dim=1)
    codes = torch.zeros((padded, dim), dtype=dtype, device=codebook.device)
    codes[:num_codes] = torch.where(finite[:, None], codebook.to(torch.float32) - centre, 0.0)
    norms = torch.full((padded,), torch.inf, device=codebook.device)
    norms[:num_codes] = torch.where(finite, codes[:num_codes].to(torch.float32).square().sum(dim=1), torch.inf)
    first_bad_code = first_out_of_range_code(codebook, norms[:num_codes])
    if fold_norms:
        return centre, codes.neg_(), norm_pieces(norms, dtype), first_bad_code
    if tf32_split:
        return centre, tf32_split_codes(codes), norms, first_bad_code
    return centre, codes, norms, first_bad_code


def rows_as_searched(x: Tensor, codebook: Tensor, precision: str) -> Tensor:
    """x as the searches read it: a 16-bit x against a float32 codebook (autocast) is converted to float32
    first when the float32 operands go to tensor cores. Converting in the kernel gives the same numbers, but
    Triton then lays the operand out for a 16-bit mma (kWidth 2) and reshuffles it every code tile: 55 SASS
    instructions per score element at d=64 on sm_90 instead of float32 x's 19.5 (compile_check)."""
    if x.dtype != codebook.dtype and x.dtype != torch.float32 and precision != "ieee":
        return x.float()
    return x


def splits_tf32(cast_to_fp32: bool, precision: str, resident: bool) -> bool:
    """Whether a search launched with these settings reads the codes' TF32 split (centred_codebook's
    ``tf32_split``): its kernels decide the same in _score_tile.code_row_length."""
    return cast_to_fp32 and precision == "tf32x3" and resident


def tf32_rounded(v: Tensor) -> Tensor:
    """Finite float32 ``v`` rounded to TF32 (11 significant bits), to nearest, ties away from zero: PTX's
    cvt.rna.tf32.f32, and _score_tile.tf32_rounded's bit arithmetic."""
    return ((v.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def tf32_split_codes(codes: Tensor) -> Tensor:
    """(K', 2d) float32: per row of the finite (K', d) float32 ``codes`` e, E = tf32(e) and then
    ε = tf32(e − E), the two parts _score_tile.tf32x3_dot multiplies (e − E is exact in float32)."""
    big = tf32_rounded(codes)
    return torch.cat([big, tf32_rounded(codes - big)], dim=1)


def gluon_search_reason(x: Tensor, codebook: Tensor) -> str | None:
    """Why the search of x against codebook could not run the Gluon kernel (None: with
    set_search_kernel("gluon") it does)."""
    if nearest_code_gluon is None:
        return f"Gluon is not importable ({_GLUON_IMPORT_ERROR})"
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if torch.compiler.is_compiling() or isinstance(x, (FakeTensor, FunctionalTensor)):
        return "traced by torch.compile, which sees Triton kernels only"
    return nearest_code_gluon.supports(x, codebook)


def norm_pieces(norms: Tensor, dtype: torch.dtype) -> Tensor:
    """(K', NORM_PIECES) of ``dtype``: per norm n, three pieces whose exact sum is n/2, then zeros; (+inf, 0, 0)
    for n = +inf. Each piece is the rest rounded to ``dtype`` and the next rest is exact in float32 (a
    number minus its own rounding), so for bfloat16 three pieces of 8 significant bits hold all 24 of n/2,
    exactly for n/2 >= 2^-116 (the third piece then stays above bfloat16's subnormal grid, 2^-133)."""
    half = norms / 2
    finite = torch.isfinite(half)
    rest = torch.where(finite, half, 0.0)
    pieces = torch.zeros((norms.shape[0], NORM_PIECES.value), dtype=dtype, device=norms.device)
    for column in range(3):
        pieces[:, column] = rest.to(dtype)
        rest = rest - pieces[:, column].to(torch.float32)
    pieces[:, 0] = torch.where(finite, pieces[:, 0], torch.inf)
    return pieces


@triton_op("fastvq::triton_nearest_code", mutates_args={})
def triton_nearest_code(x: Tensor, codebook: Tensor,
                        want_quantized: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """indices int64 (N,), sqdist float32 (N,), quantized (N, d) in x.dtype, or (0, d) if not wanted, and
    the range check int64 (2,): the first finite codebook row and the first finite x row too far from the
    search centre (K and N when none; fastvq.backends.search_range raises on them).

    x (N, d) and codebook (K, d) in float32/bfloat16/float16, any strides, K >= 1.

    bf16 on Hopper with set_search_kernel("gluon") (and d <= 64): nearest_code_gluon's kernel, then the
    split epilogue. Otherwise, grid: one program per row block (_nearest_code_kernel), unless the row
    blocks cannot fill the GPU: when ceil(N / 32) <= SMs / 2 and 2048 <= K < 2^31 - 128
    (nearest_code_split.use_split), programs also take code ranges and merge by an atomic min of (score,
    index) keys, deterministic by construction.
    """
    num_rows, dim = x.shape
    num_codes = codebook.shape[0]
    indices = torch.empty((num_rows,), dtype=torch.int64, device=x.device)
    sqdist = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
    quantized = x.new_empty((num_rows if want_quantized else 0, dim))
    if num_rows == 0:
        return indices, sqdist, quantized, torch.tensor([num_codes, 0], device=x.device)
    same_dtype = x.dtype == codebook.dtype
    tensor_cores = same_dtype and x.dtype in _TENSOR_CORE_DTYPES
    # The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584,
    # "not supported yet"), so it gets float32 operands: exact, as bf16 products are exact in fp32.
    upcast = not tensor_cores or (interpreting() and x.dtype == torch.bfloat16)
    # The x tile stays in registers for the whole codebook walk when d <= BLOCK_D: up to d = 256 on tensor
    # cores; fp32 operands take twice the registers and shared memory, so up to 64.
    block_d = block_d_for(dim, MAX_RESIDENT_D if not upcast else MAX_BLOCK_D // 2)
    if dim > block_d:  # d-slices, 64 or 32 wide: the re-read (BLOCK_N, BLOCK_D) tiles spill otherwise
        block_d = block_d_for(dim, MAX_BLOCK_D // 2 if not upcast else MAX_BLOCK_D // 4)
    # Both operands are rounded to the codebook's dtype on tensor cores, else searched in float32. bf16 folds
    # the norms into the dot (_argmin_walk.py); fp16's range could not hold them.
    fold_norms = tensor_cores and x.dtype == torch.bfloat16
    # Float32 operands at fastvq.triton.fp32_precision() ("tf32x3" by default); bf16/fp16 ignore it.
    precision = search_precision(x.dtype, codebook.dtype)
    centre, codes, code_norms, first_bad_code = centred_codebook(
        codebook, codebook.dtype if tensor_cores else torch.float32, fold_norms,
        tf32_split=splits_tf32(upcast, precision, dim <= block_d))
    range_check = torch.stack([first_bad_code, torch.full_like(first_bad_code, num_rows)])
    resident = dim <= block_d
    write_quantized = want_quantized and same_dtype
    searched = rows_as_searched(x, codebook, precision)
    if fold_norms and search_kernel() == "gluon" and gluon_search_reason(x, codebook) is None:
        keys = nearest_code_gluon.search_keys(x, centre, codes, code_norms, num_codes, split.sm_count(x.device))
        split.split_epilogue(x, centre, codebook, keys, indices, sqdist, quantized, range_check, write_quantized)
    # Few row blocks for the SMs (ceil(N / 32) <= SMs / 2) and K >= 2048: split over codes too.
    elif split.use_split(num_rows, num_codes, split.sm_count(x.device)):
        split.nearest_code_split(searched, codebook, centre, codes, code_norms, indices, sqdist, quantized, range_check,
                                 write_quantized=write_quantized, cast_to_fp32=upcast, input_precision=precision,
                                 block_d=block_d, resident=resident, fold_norms=fold_norms)
    else:
        launch(
            _nearest_code_kernel, lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]),),
            searched, centre, codes, code_norms, codebook,
            indices, sqdist, quantized, range_check,
            num_rows, num_codes, dim, (num_rows - 1).bit_length(),
            searched.stride(0), searched.stride(1), codebook.stride(0), codebook.stride(1),
            WRITE_QUANTIZED=write_quantized,
            CAST_TO_FP32=upcast,
            INPUT_PRECISION=precision,
            BLOCK_D=block_d,
            X_RESIDENT=resident,
            FOLD_NORMS=fold_norms,
        )
    if want_quantized and not same_dtype:
        # Rounding codebook rows to x's dtype is left to torch (round-to-nearest-even), so the
        # result matches codebook[idx].to(x.dtype) exactly; the kernel only ever copies bits.
        quantized = codebook[indices].to(x.dtype)
    return indices, sqdist, quantized, range_check
