"""quantize_backward in Triton, as ``fastvq::triton_quantize_backward``.

    grad_x          = G + commit_scale · (x − e_idx)                        (G: below, + commitment)
    grad_codebook_k = codebook_scale · Σ_{i: idx_i = k} (e_k − x_i)        (codebook loss, a scatter by index)

G = grad_quantized (straight-through), or with ``rotation_trick`` the rotation trick's
(Fifty et al. 2024, as vector-quantize-pytorch writes it; fastvq/reference.py: rotate_to), per
row with q = e_idx, g = grad_quantized and vqp's safe division (ε = 1e-6):

    n_x = max(‖x‖, ε), u = x/n_x, q̂ = q/max(‖q‖, ε), a = u + q̂, w = a/max(‖a‖, ε), s = ‖q‖/n_x
    G = s·(g − 2w(w·g) + 2u(q̂·g))                                       (= s·Rᵀg; R is never built)

The straight-through kernel reads each row's x, e_idx and grad_quantized once (programs tile
rows × column blocks), writes grad_x, and (default) scatters −(x − e_idx) into a float64 (K, d)
buffer with relaxed atomic adds (float32 atomics would lose the low bits of a code's sum over
millions of rows), which is then rounded to float32, scaled by codebook_scale and cast to the
codebook's dtype. With ROTATION_TRICK each program owns whole rows and loops over d in BLOCK_D
chunks three times: ‖x‖² and ‖q‖²; then ‖a‖², a·g and q̂·g from a formed elementwise (not from
the expansion ‖u‖² + ‖q̂‖² + 2u·q̂, which cancels when x ≈ −q); then the write and the scatter.
The scales are 0-dim device tensors read inside the kernel, so nothing synchronises with the host.

Deterministic mode (see fastvq/triton/ema_stats.py for how it is selected) computes
the codebook gradient with the sort-and-segment reduction of segment_sum.py instead.
Arithmetic is float32; grad_x is rounded to x's dtype once, at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ._jit import block_d_for, deterministic, kernel, launch
from ..numerics import sort_by_code
from .segment_sum import segment_sum


# Rows × columns of one rotation-trick chunk (BLOCK_N · BLOCK_D).
ROTATION_CHUNK_ELEMENTS = 512
# vector-quantize-pytorch's safe division: norms are clamped to at least this (fastvq.ops.ROTATION_EPS).
ROTATION_EPS = tl.constexpr(1e-6)


# Not autotuned: an autotuner re-runs the kernel per config, which would add the atomics twice.
@kernel()
def _quantize_backward_kernel(
    grad_q_ptr, x_ptr, codebook_ptr, indices_ptr, commit_scale_ptr, grad_x_ptr, grad_codebook_ptr,
    N, K, d,
    stride_gn, stride_gd, stride_xn, stride_xd, stride_cn, stride_cd,
    NEED_GRAD_X: tl.constexpr,
    SCATTER_GRAD_CODEBOOK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROTATION_TRICK: tl.constexpr = False,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: no overflow for any N
    lanes = tl.arange(0, BLOCK_D).to(tl.int64)  # int64: a column times a large stride does not overflow
    row_mask = rows < N
    code = tl.load(indices_ptr + rows, mask=row_mask, other=0)
    valid = row_mask & (code >= 0) & (code < K)  # an invalid index never reads or writes out of bounds
    if ROTATION_TRICK:
        # Whole rows per program (grid (row blocks, 1)); needs NEED_GRAD_X. An invalid index reads
        # x and q as 0, so its G is 0.
        x_rows = x_ptr + rows[:, None] * stride_xn
        g_rows = grad_q_ptr + rows[:, None] * stride_gn
        e_rows = codebook_ptr + code[:, None] * stride_cn
        # Correctly rounded divisions (div.rn; Triton's `/` is div.full, up to 2 ulp off), not
        # multiplications by reciprocals, as the oracle does: where x̂ ≈ −q̂ the result hangs on the
        # last bits of a = u + q̂ (d = 1: u and q̂ are ±1 exactly only by a correctly rounded division).
        # pass 1: ‖x‖², ‖q‖² (the same operations on both, so x = −q gives equal norms and a = 0 exactly)
        x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        q_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            cols = start + lanes
            mask = valid[:, None] & (cols[None, :] < d)
            x = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            e = tl.load(e_rows + cols[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
            x_sq += tl.sum(x * x, axis=1)
            q_sq += tl.sum(e * e, axis=1)
        x_norm = tl.maximum(tl.sqrt_rn(x_sq), ROTATION_EPS)
        q_norm = tl.sqrt_rn(q_sq)
        q_div = tl.maximum(q_norm, ROTATION_EPS)
        # pass 2: ‖a‖², a·g, q̂·g with a = u + q̂ formed elementwise
        a_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a_dot_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        qhat_dot_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            cols = start + lanes
            col_mask = cols[None, :] < d
            mask = valid[:, None] & col_mask
            x = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            e = tl.load(e_rows + cols[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_rows + cols[None, :] * stride_gd, mask=row_mask[:, None] & col_mask, other=0.0)
            g = g.to(tl.float32)
            qhat = tl.fdiv(e, q_div[:, None], ieee_rounding=True)
            a = tl.fdiv(x, x_norm[:, None], ieee_rounding=True) + qhat
            a_sq += tl.sum(a * a, axis=1)
            a_dot_g += tl.sum(a * g, axis=1)
            qhat_dot_g += tl.sum(qhat * g, axis=1)
        a_div = tl.maximum(tl.sqrt_rn(a_sq), ROTATION_EPS)
        two_w_dot_g = 2.0 * tl.fdiv(a_dot_g, a_div, ieee_rounding=True)
        two_qhat_dot_g = 2.0 * qhat_dot_g
        s = tl.fdiv(q_norm, x_norm, ieee_rounding=True)
        commit_scale = tl.load(commit_scale_ptr)
        # pass 3: grad_x = s·(g − 2w(w·g) + 2u(q̂·g)) + commit_scale·(x − q), and the scatter
        for start in range(0, d, BLOCK_D):
            cols = start + lanes
            col_mask = cols[None, :] < d
            mask = valid[:, None] & col_mask
            out_mask = row_mask[:, None] & col_mask
            x = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            e = tl.load(e_rows + cols[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_rows + cols[None, :] * stride_gd, mask=out_mask, other=0.0).to(tl.float32)
            u = tl.fdiv(x, x_norm[:, None], ieee_rounding=True)
            w = tl.fdiv(u + tl.fdiv(e, q_div[:, None], ieee_rounding=True), a_div[:, None], ieee_rounding=True)
            rotated = s[:, None] * (g - w * two_w_dot_g[:, None] + u * two_qhat_dot_g[:, None])
            residual = x - e
            grad_x = rotated + commit_scale * residual
            tl.store(grad_x_ptr + rows[:, None] * d + cols[None, :], grad_x.to(grad_x_ptr.dtype.element_ty),
                     mask=out_mask)
            if SCATTER_GRAD_CODEBOOK:
                tl.atomic_add(grad_codebook_ptr + code[:, None] * d + cols[None, :], -residual.to(tl.float64),
                              mask=mask, sem="relaxed")
    else:
        cols = tl.program_id(1) * BLOCK_D + lanes
        col_mask = cols[None, :] < d
        mask = valid[:, None] & col_mask
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0)
        e = tl.load(codebook_ptr + code[:, None] * stride_cn + cols[None, :] * stride_cd, mask=mask, other=0.0)
        residual = x.to(tl.float32) - e.to(tl.float32)
        if NEED_GRAD_X:
            commit_scale = tl.load(commit_scale_ptr)
            out_mask = row_mask[:, None] & col_mask
            grad_q = tl.load(grad_q_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gd, mask=out_mask,
                             other=0.0)
            grad_x = grad_q.to(tl.float32) + commit_scale * residual
            tl.store(grad_x_ptr + rows[:, None] * d + cols[None, :], grad_x.to(grad_x_ptr.dtype.element_ty),
                     mask=out_mask)
        if SCATTER_GRAD_CODEBOOK:
            tl.atomic_add(grad_codebook_ptr + code[:, None] * d + cols[None, :], -residual.to(tl.float64), mask=mask,
                          sem="relaxed")


@triton_op("fastvq::triton_quantize_backward", mutates_args={})
def triton_quantize_backward(
    grad_quantized: Tensor,
    x: Tensor,
    codebook: Tensor,
    indices: Tensor,
    commit_scale: Tensor,
    codebook_scale: Tensor,
    need_grad_x: bool,
    need_grad_codebook: bool,
    rotation_trick: bool = False,
) -> tuple[Tensor, Tensor]:
    """(grad_x (N, d) in x.dtype, grad_codebook (K, d) in codebook.dtype); a gradient not
    asked for comes back as an empty (0,) tensor (a custom op cannot return None).
    ``rotation_trick``: grad_x takes the rotation trick's G instead of grad_quantized."""
    num_rows, dim = x.shape
    num_codes = codebook.shape[0]
    indices = indices.contiguous()
    commit_scale = commit_scale.to(device=x.device, dtype=torch.float32)
    codebook_scale = codebook_scale.to(device=x.device, dtype=torch.float32)
    scatter = need_grad_codebook and not deterministic()
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_x else x.new_empty((0,))
    accumulated = (torch.zeros((num_codes, dim), dtype=torch.float64, device=x.device) if scatter
                   else x.new_empty((0,), dtype=torch.float64))

    if num_rows > 0 and (need_grad_x or scatter):
        block_d = block_d_for(dim)
        rotation = rotation_trick and need_grad_x  # without grad_x there is nothing to rotate
        if rotation:
            # Whole-row sums: one program per row block, looping over d. 512 elements per chunk keep
            # it at <= 116 registers and no spills (ptxas, sm_80/sm_90); 32·128 would spill.
            block_n = max(1, ROTATION_CHUNK_ELEMENTS // block_d)
            grid = (triton.cdiv(num_rows, block_n), 1)
        else:
            block_n = 64 if block_d <= 64 else 32
            grid = (triton.cdiv(num_rows, block_n), triton.cdiv(dim, block_d))
        launch(
            _quantize_backward_kernel, grid,
            grad_quantized, x, codebook, indices, commit_scale, grad_x, accumulated,
            num_rows, num_codes, dim,
            grad_quantized.stride(0), grad_quantized.stride(1), x.stride(0), x.stride(1),
            codebook.stride(0), codebook.stride(1),
            NEED_GRAD_X=need_grad_x, SCATTER_GRAD_CODEBOOK=scatter, BLOCK_N=block_n, BLOCK_D=block_d,
            ROTATION_TRICK=rotation, num_warps=4,
        )
    if not need_grad_codebook:
        return grad_x, codebook.new_empty((0,))
    if not scatter:
        perm, offsets = sort_by_code(indices, num_codes)
        accumulated = segment_sum(x, perm, offsets, num_codes, codebook=codebook)
    # float64 × the scale, rounded once (0-dim scale: the deterministic path's float32 sums stay float32)
    return grad_x, (accumulated * codebook_scale.to(torch.float64)).to(codebook.dtype)
