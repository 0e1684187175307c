"""ema_stats (per-code counts and sums) on every (backend, device) pair against fastvq.reference,
with the GPU backends' atomic and deterministic (sorted) reductions."""
from __future__ import annotations

import pytest
import torch

import fastvq
from fastvq import reference

from conftest import (REDUCTION_DTYPES, REDUCTION_IDS, TOLERANCES, assert_within_summation_bound, randn,
                      skip_if_slow, skip_reduction_if_redundant, to_cpu, use_reduction)

# (N, K, d, usage): "uniform" indices, or "skewed" ones (most rows on a few codes, many codes unused).
CASES = [
    (0, 3, 4, "uniform"), (0, 3, 33, "uniform"), (0, 5, 3, "skewed"), (1, 1, 1, "uniform"), (7, 3, 3, "uniform"),
    (7, 1030, 8, "skewed"), (300, 257, 33, "uniform"), (300, 3, 64, "uniform"), (1000, 3, 130, "skewed"),
    (1030, 257, 33, "uniform"), (4099, 3, 130, "uniform"), (4099, 257, 33, "skewed"),
]


def draw_indices(num_rows: int, num_codes: int, usage: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if usage == "uniform":
        return torch.randint(0, num_codes, (num_rows,), generator=generator)
    return (torch.rand(num_rows, generator=generator) ** 3 * num_codes).long().clamp_(max=num_codes - 1)


def ema_stats(pair, x, indices, num_codes):
    """fastvq.ema_stats on the pair's device; (counts, sums) on the CPU."""
    device_x, device_indices = pair.to(x, indices)
    pair.require(device_x)
    return to_cpu(*fastvq.ema_stats(device_x, device_indices, num_codes, backend=pair.backend))


@pytest.mark.parametrize("reduction,dtype", REDUCTION_DTYPES, ids=REDUCTION_IDS)
@pytest.mark.parametrize("num_rows,num_codes,dim,usage", CASES)
def test_ema_stats_matches_reference(pair, monkeypatch, reduction, dtype, num_rows, num_codes, dim, usage):
    skip_if_slow(pair, num_rows, num_codes, dim)
    skip_reduction_if_redundant(pair, reduction, dtype, num_codes)
    use_reduction(monkeypatch, reduction)
    x = randn(num_rows, dim, seed=num_rows + dim, dtype=dtype)
    indices = draw_indices(num_rows, num_codes, usage, seed=num_rows + num_codes)
    counts, sums = ema_stats(pair, x, indices, num_codes)
    want_counts, _ = reference.ema_stats(x.double(), indices, num_codes)
    assert counts.dtype == sums.dtype == torch.float32 and sums.shape == (num_codes, dim)
    torch.testing.assert_close(counts.double(), want_counts, rtol=0, atol=0)
    assert_within_summation_bound(sums, x, indices, num_codes)


@pytest.mark.parametrize("reduction", ["atomic", "deterministic"])
def test_ema_stats_non_contiguous_and_skewed(pair, monkeypatch, reduction):
    skip_reduction_if_redundant(pair, reduction, torch.float32)
    use_reduction(monkeypatch, reduction)
    x = pair.to(randn(33, 600, seed=2)).t()[::2]  # (300, 33), strides (2, 600), made on the device
    indices = torch.zeros(300, dtype=torch.int64)
    indices[::50] = 2  # almost every row on one code: a collapsed codebook
    pair.require(x)
    counts, sums = to_cpu(*fastvq.ema_stats(x, pair.to(indices), 3, backend=pair.backend))
    want_counts, want_sums = reference.ema_stats(x.cpu().double(), indices, 3)
    torch.testing.assert_close(counts.double(), want_counts, rtol=0, atol=0)
    torch.testing.assert_close(sums.double(), want_sums, **TOLERANCES[torch.float32])
