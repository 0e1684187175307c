"""ema_stats in Triton: per-code counts (K,) and sums (K, d) in float32, as ``fastvq::triton_ema_stats``.

Default: atomics. Each program owns BLOCK_N rows × BLOCK_D columns and adds them into
sums[idx] with relaxed atomic adds; the d-slice-0 programs add 1 to counts[idx]. Why
atomics: one pass over x, no sort, and the K·d targets are spread widely, so contention
stays low for any codebook that is in use. Counts are int64 atomics, exact for any N
(float32 ones would stop at 2^24 = 16,777,216 per code, issue 14 finding 7), and the sums
accumulate in float64 (a float32 sum of millions of rows would lose its low bits, and
stop growing once it is 2^24 times the rows); both are rounded to float32 once, at the
end. The float64 sums' rounding depends on the order the atomics land in, far below the
float32 result's last bit, so the result can differ in that last bit between runs.

Deterministic mode (``torch.use_deterministic_algorithms(True)`` or
FASTVQ_DETERMINISTIC=1) sorts the indices and reduces each code's rows in a fixed
order instead (fastvq/triton/segment_sum.py): bitwise reproducible, slower when many
rows share one code. Indices outside [0, K) are ignored by both paths.
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


# Not autotuned: an autotuner re-runs the kernel per config, which would add the atomics twice.
@kernel()
def _ema_stats_kernel(
    x_ptr, indices_ptr, counts_ptr, sums_ptr,
    N, K, d, stride_xn, stride_xd,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: no overflow for any N
    pid_d = tl.program_id(1)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # int64: cols * stride_xd does not overflow
    row_mask = rows < N
    code = tl.load(indices_ptr + rows, mask=row_mask, other=0)
    valid = row_mask & (code >= 0) & (code < K)
    mask = valid[:, None] & (cols[None, :] < d)
    x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0)
    tl.atomic_add(sums_ptr + code[:, None] * d + cols[None, :], x.to(tl.float64), mask=mask, sem="relaxed")
    if pid_d == 0:
        ones = tl.full([BLOCK_N], 1, tl.int64)
        tl.atomic_add(counts_ptr + code, ones, mask=valid, sem="relaxed")


@triton_op("fastvq::triton_ema_stats", mutates_args={})
def triton_ema_stats(x: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """counts float32 (num_codes,), sums float32 (num_codes, d) for x (N, d), indices int64 (N,)."""
    num_rows, dim = x.shape
    indices = indices.contiguous()
    if deterministic():
        perm, offsets = sort_by_code(indices, num_codes)
        counts = (offsets[1:] - offsets[:-1]).to(torch.float32)
        return counts, segment_sum(x, perm, offsets, num_codes)
    counts = torch.zeros((num_codes,), dtype=torch.int64, device=x.device)
    sums = torch.zeros((num_codes, dim), dtype=torch.float64, device=x.device)
    if num_rows > 0:
        block_d = block_d_for(dim)
        block_n = 64 if block_d <= 64 else 32
        grid = (triton.cdiv(num_rows, block_n), triton.cdiv(dim, block_d))
        launch(
            _ema_stats_kernel, grid,
            x, indices, counts, sums,
            num_rows, num_codes, dim, x.stride(0), x.stride(1),
            BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=4,
        )
    return counts.to(torch.float32), sums.to(torch.float32)
