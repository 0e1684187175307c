"""quantize_backward in Triton, as ``fastvq::triton_quantize_backward``.

    grad_x          = grad_quantized + commit_scale · (x − e_idx)          (straight-through + commitment)
    grad_codebook_k = codebook_scale · Σ_{i: idx_i = k} (e_k − x_i)        (codebook loss, a scatter by index)

One kernel reads each row's x, e_idx and grad_quantized once, writes grad_x, and
(default) scatters −(x − e_idx) into a float32 (K, d) buffer with relaxed atomic adds,
which is then scaled by codebook_scale and cast to the codebook's dtype. The scales
are 0-dim device tensors read inside the kernel, so nothing synchronises with the host.

Deterministic mode (see fastvq/triton/ema_stats.py for how it is selected) computes
the codebook gradient with the sort-and-segment reduction of segment_sum.py instead.
Arithmetic is float32; grad_x is rounded to x's dtype once, at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._jit import block_d_for, deterministic, for_current_mode, kernel
from ..numerics import sort_by_code
from .segment_sum import segment_sum


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
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: no overflow for any N
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols[None, :] < d
    code = tl.load(indices_ptr + rows, mask=row_mask, other=0)
    valid = row_mask & (code >= 0) & (code < K)  # an invalid index never reads or writes out of bounds
    mask = valid[:, None] & col_mask
    x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0)
    e = tl.load(codebook_ptr + code[:, None] * stride_cn + cols[None, :] * stride_cd, mask=mask, other=0.0)
    residual = x.to(tl.float32) - e.to(tl.float32)
    if NEED_GRAD_X:
        commit_scale = tl.load(commit_scale_ptr)
        out_mask = row_mask[:, None] & col_mask
        grad_q = tl.load(grad_q_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gd, mask=out_mask, other=0.0)
        grad_x = grad_q.to(tl.float32) + commit_scale * residual
        tl.store(grad_x_ptr + rows[:, None] * d + cols[None, :], grad_x.to(grad_x_ptr.dtype.element_ty), mask=out_mask)
    if SCATTER_GRAD_CODEBOOK:
        tl.atomic_add(grad_codebook_ptr + code[:, None] * d + cols[None, :], -residual, mask=mask, sem="relaxed")


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
) -> tuple[Tensor, Tensor]:
    """(grad_x (N, d) in x.dtype, grad_codebook (K, d) in codebook.dtype); a gradient not
    asked for comes back as an empty (0,) tensor (a custom op cannot return None)."""
    num_rows, dim = x.shape
    num_codes = codebook.shape[0]
    indices = indices.contiguous()
    commit_scale = commit_scale.to(device=x.device, dtype=torch.float32)
    codebook_scale = codebook_scale.to(device=x.device, dtype=torch.float32)
    scatter = need_grad_codebook and not deterministic()
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_x else x.new_empty((0,))
    accumulated = (torch.zeros((num_codes, dim), dtype=torch.float32, device=x.device) if scatter
                   else x.new_empty((0,), dtype=torch.float32))

    if num_rows > 0 and (need_grad_x or scatter):
        block_d = block_d_for(dim)
        block_n = 64 if block_d <= 64 else 32
        grid = (triton.cdiv(num_rows, block_n), triton.cdiv(dim, block_d))
        wrap_triton(for_current_mode(_quantize_backward_kernel))[grid](
            grad_quantized, x, codebook, indices, commit_scale, grad_x, accumulated,
            num_rows, num_codes, dim,
            grad_quantized.stride(0), grad_quantized.stride(1), x.stride(0), x.stride(1),
            codebook.stride(0), codebook.stride(1),
            NEED_GRAD_X=need_grad_x, SCATTER_GRAD_CODEBOOK=scatter, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=4,
        )
    if not need_grad_codebook:
        return grad_x, codebook.new_empty((0,))
    if not scatter:
        perm, offsets = sort_by_code(indices, num_codes)
        accumulated = segment_sum(x, perm, offsets, num_codes, codebook=codebook)
    return grad_x, (accumulated * codebook_scale).to(codebook.dtype)
