"""sample_code in Triton: vqp's stochastic_sample_codes as one fused Gumbel-max pass,
registered as ``fastvq::triton_sample_code``.

Each program owns BLOCK_N rows and walks the codebook in BLOCK_K tiles. Per tile, ``tl.dot``
gives x·e, the score is vqp's −logit (sqrt(max(‖x‖² + ‖e‖² − 2x·e, 1e-8)), or −x·e with cosine),
and the noise float32(T·−log(−log(u))) is hashed from (seed, row, code) in uint32 arithmetic
exactly as fastvq/reference.py (sample_noise) specifies, its logs in float64 and rounded once,
so it is bitwise the reference's. A running (min, argmin) per row keeps ties at the lowest
index; nothing of size N×K exists.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ._jit import block_d_for, device_function, kernel, launch


@device_function
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@kernel(do_not_specialize=["seed_lo", "seed_hi"])  # a new seed every call: no recompiles
def _sample_code_kernel(
    x_ptr, codebook_ptr, code_norms_ptr, temperature_ptr, indices_ptr,
    N, K, d, seed_lo, seed_hi,
    stride_xn, stride_xd, stride_cn, stride_cd,
    COSINE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    x_rows = x_ptr + rows[:, None] * stride_xn
    lanes_d = tl.arange(0, BLOCK_D).to(tl.int64)  # int64: cols * stride does not overflow
    lanes_k = tl.arange(0, BLOCK_K)
    seed_lo = seed_lo.to(tl.uint32)
    seed_hi = seed_hi.to(tl.uint32)
    row_key = _fmix32(_fmix32((rows & 0xFFFFFFFF).to(tl.uint32) ^ seed_lo) ^ (rows >> 32).to(tl.uint32))
    temperature = tl.load(temperature_ptr)  # float64

    x_norms = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + lanes_d
        x_t = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_mask[:, None] & (cols[None, :] < d), other=0.0)
        x_norms += tl.sum(x_t * x_t, axis=1)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + lanes_k.to(tl.int64)
        code_mask = codes < K
        codes_t = codebook_ptr + codes[None, :] * stride_cn
        xe = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + lanes_d
            col_mask = cols < d
            e_t = tl.load(codes_t + cols[:, None] * stride_cd, mask=col_mask[:, None] & code_mask[None, :], other=0.0)
            x_t = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            xe = tl.dot(x_t, e_t, xe, input_precision="ieee")
        if COSINE:
            score = -xe
        else:
            norms = tl.load(code_norms_ptr + codes, mask=code_mask, other=0.0)
            sq = (x_norms[:, None] + norms[None, :]) - 2.0 * xe
            sq = tl.where(sq < 1e-8, 1e-8, sq)  # vqp's clamp; a NaN stays NaN
            score = tl.sqrt_rn(sq)
        code_key = _fmix32(codes.to(tl.uint32) ^ seed_hi ^ 0x9E3779B9)
        bits = _fmix32(row_key[:, None] ^ code_key[None, :])
        u = ((bits >> 9) * 2 + 1).to(tl.float64) / 16777216.0
        noise = (temperature * -tl.log(-tl.log(u))).to(tl.float32)
        perturbed = score - noise
        usable = (perturbed == perturbed) & code_mask[None, :]
        perturbed = tl.where(usable, perturbed, float("inf"))
        tile_best, tile_idx = tl.min(perturbed, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, k0 + tile_idx.to(tl.int64), best_idx)
    tl.store(indices_ptr + rows, best_idx, mask=row_mask)


def _as_int32(value: int) -> int:
    """A uint32 as the int32 with its bits (Triton types larger Python ints as int64)."""
    return value - (1 << 32) if value >= 1 << 31 else value


@triton_op("fastvq::triton_sample_code", mutates_args={})
def triton_sample_code(x: Tensor, codebook: Tensor, temperature: float, seed: int, cosine: bool) -> Tensor:
    """indices int64 (N,): fastvq.reference.sample_code's draw. x (N, d) and codebook (K, d), any
    float dtype (computed in float32), any strides."""
    num_rows, dim = x.shape
    indices = torch.empty((num_rows,), dtype=torch.int64, device=x.device)
    if num_rows == 0:
        return indices
    x, codebook = x.to(torch.float32), codebook.to(torch.float32)
    code_norms = codebook.square().sum(dim=1)
    temperature_t = torch.full((1,), temperature, dtype=torch.float64, device=x.device)
    block_n, block_k = 32, 32

    launch(
        _sample_code_kernel, (triton.cdiv(num_rows, block_n),),
        x, codebook, code_norms, temperature_t, indices,
        num_rows, codebook.shape[0], dim, _as_int32(seed & 0xFFFFFFFF), _as_int32((seed >> 32) & 0xFFFFFFFF),
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
        COSINE=cosine, BLOCK_D=block_d_for(dim, 64), BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return indices
