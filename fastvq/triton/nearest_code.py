"""nearest_code in Triton: the search fused with the gather, registered as ``fastvq::triton_nearest_code``.

The search is a GEMM with a min-epilogue. Each program owns BLOCK_N rows of x and
walks the codebook in BLOCK_K-row tiles; per tile ``tl.dot`` gives x·e, and with
‖e_k‖² computed once per call (a (K,) vector, O(K·d))

    score(i, k) = ‖e_k‖² − 2 x_i·e_k    (= ‖x_i − e_k‖² − ‖x_i‖², same argmin)

is folded into a running (min, argmin) per row held in registers. Ties go to the
lowest index: ``tl.min`` breaks ties to the left inside a tile and a later tile
replaces the running best only when strictly smaller. No N×K buffer exists.

Non-finite rule (fastvq/reference.py): a NaN or ±inf score counts as +inf, so a
non-finite code never wins while a finite one exists, and a row whose every score
is non-finite (a row of x with NaN/Inf) keeps the initial index 0.

The epilogue gathers e_idx for each row, writes it as the quantized row and computes
sqdist = ‖x − e_idx‖² directly, in float32, as the contract says. (When x and the
codebook differ in dtype the launcher does the gather with torch instead, so the
rounding to x's dtype is torch's.)

Precision: bf16/fp16 inputs of one dtype go to tensor cores with fp32 accumulation;
float32 (and mixed-dtype) inputs use full-precision fp32 ("ieee") unless TF32 is
allowed (fastvq.triton.set_allow_tf32 / FASTVQ_TRITON_TF32=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._jit import MAX_BLOCK_D, allow_tf32, block_d_for, for_current_mode, interpreting, kernel

_TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)


_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (32, 64, 4, 2),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
        (128, 64, 4, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 3),
        (256, 64, 8, 3),
    ]
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)


@kernel(configs=_CONFIGS, interpreter_config=_INTERPRETER_CONFIG, key=["K", "d"])
def _nearest_code_kernel(
    x_ptr, codebook_ptr, code_norms_ptr, indices_ptr, sqdist_ptr, quantized_ptr,
    N, K, d,
    stride_xn, stride_xd, stride_cn, stride_cd,
    WRITE_QUANTIZED: tl.constexpr,
    CAST_TO_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    X_RESIDENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: no overflow for any N
    row_mask = rows < N
    x_rows = x_ptr + rows[:, None] * stride_xn
    lanes_d = tl.arange(0, BLOCK_D)
    lanes_k = tl.arange(0, BLOCK_K)

    if X_RESIDENT:  # d <= BLOCK_D: the x tile stays in registers for the whole codebook walk
        x_res = tl.load(x_rows + lanes_d[None, :] * stride_xd,
                        mask=row_mask[:, None] & (lanes_d[None, :] < d), other=0.0)
        if CAST_TO_FP32:
            x_res = x_res.to(tl.float32)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + lanes_k.to(tl.int64)
        code_mask = codes < K
        # Codebook tiles are loaded transposed, (BLOCK_D, BLOCK_K), ready for x @ eᵀ.
        codes_t = codebook_ptr + codes[None, :] * stride_cn
        if X_RESIDENT:  # no inner loop, so Triton software-pipelines this (innermost) loop's loads
            e_t = tl.load(codes_t + lanes_d[:, None] * stride_cd,
                          mask=(lanes_d[:, None] < d) & code_mask[None, :], other=0.0)
            if CAST_TO_FP32:
                e_t = e_t.to(tl.float32)
            xe = tl.dot(x_res, e_t, input_precision=INPUT_PRECISION)
        else:
            xe = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + lanes_d
                col_mask = cols < d
                e_t = tl.load(codes_t + cols[:, None] * stride_cd,
                              mask=col_mask[:, None] & code_mask[None, :], other=0.0)
                x_t = tl.load(x_rows + cols[None, :] * stride_xd,
                              mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                if CAST_TO_FP32:
                    e_t = e_t.to(tl.float32)
                    x_t = x_t.to(tl.float32)
                xe = tl.dot(x_t, e_t, xe, input_precision=INPUT_PRECISION)
        norms = tl.load(code_norms_ptr + codes, mask=code_mask, other=0.0)
        score = norms[None, :] - 2.0 * xe
        usable = (score == score) & (tl.abs(score) < float("inf")) & code_mask[None, :]
        score = tl.where(usable, score, float("inf"))
        tile_best, tile_idx = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, k0 + tile_idx.to(tl.int64), best_idx)

    # Epilogue: gather e_idx, write it, and measure ‖x − e_idx‖² directly.
    chosen = codebook_ptr + best_idx[:, None] * stride_cn
    sqdist = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + lanes_d
        mask = row_mask[:, None] & (cols[None, :] < d)
        x_f32 = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(chosen + cols[None, :] * stride_cd, mask=mask, other=0.0)
        diff = x_f32 - e.to(tl.float32)
        sqdist += tl.sum(diff * diff, axis=1)
        if WRITE_QUANTIZED:
            q_ptrs = quantized_ptr + rows[:, None] * d + cols[None, :]
            tl.store(q_ptrs, e.to(quantized_ptr.dtype.element_ty), mask=mask)
    tl.store(indices_ptr + rows, best_idx, mask=row_mask)
    tl.store(sqdist_ptr + rows, sqdist, mask=row_mask)


@triton_op("fastvq::triton_nearest_code", mutates_args={})
def triton_nearest_code(x: Tensor, codebook: Tensor, want_quantized: bool) -> tuple[Tensor, Tensor, Tensor]:
    """indices int64 (N,), sqdist float32 (N,), quantized (N, d) in x.dtype, or (0, d) if not wanted.

    x (N, d) and codebook (K, d) in float32/bfloat16/float16, any strides, N >= 1, K >= 1.
    """
    num_rows, dim = x.shape
    num_codes = codebook.shape[0]
    indices = torch.empty((num_rows,), dtype=torch.int64, device=x.device)
    sqdist = torch.empty((num_rows,), dtype=torch.float32, device=x.device)
    quantized = x.new_empty((num_rows if want_quantized else 0, dim))
    if num_rows == 0:
        return indices, sqdist, quantized
    same_dtype = x.dtype == codebook.dtype
    tensor_cores = same_dtype and x.dtype in _TENSOR_CORE_DTYPES
    # The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584,
    # "not supported yet"), so it gets float32 operands: exact, as bf16 products are exact in fp32.
    upcast = not tensor_cores or (interpreting() and x.dtype == torch.bfloat16)
    # The x tile stays in registers for the whole codebook walk when d <= BLOCK_D; fp32 operands
    # take twice the registers and shared memory, so their cap is half.
    block_d = block_d_for(dim, MAX_BLOCK_D if not upcast else MAX_BLOCK_D // 2)
    # ‖e_k‖² once per call (O(K·d)), not once per program.
    code_norms = codebook.to(torch.float32).square().sum(dim=1)

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_N"]),)

    wrap_triton(for_current_mode(_nearest_code_kernel))[grid](
        x, codebook, code_norms, indices, sqdist, quantized,
        num_rows, num_codes, dim,
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
        WRITE_QUANTIZED=want_quantized and same_dtype,
        CAST_TO_FP32=upcast,
        # "ieee" only matters for float32 operands; bf16/fp16 take the backend default.
        INPUT_PRECISION="tf32" if not upcast or allow_tf32() else "ieee",
        BLOCK_D=block_d,
        X_RESIDENT=dim <= block_d,
    )
    if want_quantized and not same_dtype:
        # Rounding codebook rows to x's dtype is left to torch (round-to-nearest-even), so the
        # result matches codebook[idx].to(x.dtype) exactly; the kernel only ever copies bits.
        quantized = codebook[indices].to(x.dtype)
    return indices, sqdist, quantized
