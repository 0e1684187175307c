"""Deterministic per-code row sums: sort the indices, then one program per (code, d-slice).

Used by ema_stats (Σ x_i) and quantize_backward (Σ e_k − x_i) when deterministic mode
is on (fastvq.triton.deterministic()). The default path uses float32 atomics instead.

Every program sums its code's rows in the stable-sorted order, BLOCK_R rows at a time
into a (BLOCK_R, BLOCK_D) register tile reduced once at the end, so the float
additions happen in the same order on every run and every GPU of one architecture.
The cost: rows of one code are summed by one program, so a collapsed codebook (most
rows on one code) serialises; that is the price of bitwise reproducibility.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit import block_d_for, kernel, launch


@kernel()
def _segment_sum_kernel(
    x_ptr, perm_ptr, offsets_ptr, codebook_ptr, out_ptr,
    d, stride_xn, stride_xd, stride_cn, stride_cd,
    RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    code = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # int64: cols * stride does not overflow
    col_mask = cols < d
    start = tl.load(offsets_ptr + code)
    end = tl.load(offsets_ptr + code + 1)
    if RESIDUAL:  # Σ (e_k − x_i): the codebook row of this segment
        e = tl.load(codebook_ptr + code * stride_cn + cols * stride_cd, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        slots = r0 + tl.arange(0, BLOCK_R)
        slot_mask = slots < end
        rows = tl.load(perm_ptr + slots, mask=slot_mask, other=0).to(tl.int64)
        mask = slot_mask[:, None] & col_mask[None, :]
        value = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0)
        value = value.to(tl.float32)
        if RESIDUAL:
            value = e[None, :] - value
        acc += tl.where(mask, value, 0.0)
    tl.store(out_ptr + code * d + cols, tl.sum(acc, axis=0), mask=col_mask)


def segment_sum(x: Tensor, perm: Tensor, offsets: Tensor, num_codes: int, codebook: Tensor | None = None) -> Tensor:
    """float32 (num_codes, d): Σ x_i per code, or Σ (codebook_k − x_i) when codebook is given."""
    dim = x.shape[1]
    out = torch.empty((num_codes, dim), dtype=torch.float32, device=x.device)
    block_d = block_d_for(dim)
    block_r = 32 if block_d > 64 else 64
    residual = codebook is not None
    source = codebook if residual else x  # any valid pointer when unused
    launch(
        _segment_sum_kernel, (num_codes, triton.cdiv(dim, block_d)),
        x, perm, offsets, source, out,
        dim, x.stride(0), x.stride(1), source.stride(0), source.stride(1),
        RESIDUAL=residual, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )
    return out
