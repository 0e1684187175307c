"""Correctness before timing: a provider's indices against fastvq.reference, judged by distance.

The oracle is slow (direct differences), so it runs on an evenly spread subset of
rows, always including the first and the last. A chosen index passes when its
exact (float64) distance exceeds the exact distance of the oracle's choice by no
more than a float32 evaluation of ‖x‖² − 2x·e + ‖e‖² can err: (d+2)·u·(‖x‖² + 2·max‖e‖²)
per distance, twice that for a swap (u = 2⁻²⁴; the bound tests/conftest.py uses).
So near-ties decided differently in float32 pass, and a wrong code does not.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import reference

UNIT_ROUNDOFF = 2.0 ** -24  # float32
# The oracle's (rows, K, d) work is kept near this many elements per case.
CHECK_ELEMENTS = 1 << 26
MAX_CHECK_ROWS = 512
MIN_CHECK_ROWS = 32


@dataclass
class Verdict:
    rows: int  # rows checked
    passed: int  # rows whose choice is within tolerance of the exact minimum
    max_excess: float  # max over rows of (d_chosen − d_min) / slack; a row passes when <= 1
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.passed == self.rows and not self.message

    @property
    def recall(self) -> float:
        return self.passed / self.rows if self.rows else float("nan")

    def to_json(self) -> dict:
        return {"rows": self.rows, "passed": self.passed, "max_excess": self.max_excess,
                "recall": self.recall, "ok": self.ok, "message": self.message}


def check_rows(num_rows: int, num_codes: int, dim: int) -> Tensor:
    """Evenly spread row numbers to check, first and last included."""
    budget = CHECK_ELEMENTS // max(1, num_codes * dim)
    count = min(num_rows, max(MIN_CHECK_ROWS, min(MAX_CHECK_ROWS, budget)))
    if num_rows == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.linspace(0, num_rows - 1, count).round().long().unique()


class Oracle:
    """fastvq.reference.nearest_code on the checked rows, cached while x and the codebook are unchanged."""

    def __init__(self) -> None:
        self._cache: list[tuple[Tensor, Tensor, Tensor]] = []

    def indices(self, x_rows: Tensor, codebook: Tensor) -> Tensor:
        for cached_x, cached_codebook, cached_indices in self._cache:
            if (cached_x.shape == x_rows.shape and cached_codebook.shape == codebook.shape
                    and torch.equal(cached_x, x_rows) and torch.equal(cached_codebook, codebook)):
                return cached_indices
        indices, _ = reference.nearest_code(x_rows, codebook)
        self._cache = [(x_rows.clone(), codebook.clone(), indices)] + self._cache[:1]
        return indices


class ExactOracle(Oracle):
    """Nearest codes by a float64 ‖e‖² − 2x·e expansion: exact enough, and fast enough, to score an
    approximate search (recall@1) on many more rows than the direct-difference oracle could."""

    def indices(self, x_rows: Tensor, codebook: Tensor, chunk_rows: int = 256) -> Tensor:
        e64 = codebook.double()
        e_sq = (e64 ** 2).sum(1)
        parts = [torch.addmm(e_sq, block.double(), e64.T, alpha=-2.0).argmin(1)
                 for block in x_rows.split(chunk_rows)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


RECALL_ROWS = 1024


def recall_rows(num_rows: int) -> Tensor:
    """Evenly spread rows on which an approximate provider's recall@1 is measured."""
    return torch.linspace(0, max(num_rows - 1, 0), min(num_rows, RECALL_ROWS)).round().long().unique()


def judge(x: Tensor, codebook: Tensor, indices: Tensor, rows: Tensor, oracle: Oracle) -> Verdict:
    """Judge ``indices`` (N,) for x (N, d) against codebook (K, d) on the given rows."""
    if not isinstance(indices, Tensor) or indices.shape != (x.shape[0],):
        got = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        return Verdict(0, 0, float("nan"), f"indices must have shape ({x.shape[0]},), got {got}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        return Verdict(0, 0, float("nan"), f"indices must be an integer tensor, got {indices.dtype}")
    chosen = indices.detach().cpu().long()[rows]
    num_codes = codebook.shape[0]
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= num_codes):
        return Verdict(len(rows), 0, float("inf"),
                       f"indices out of range [0, {num_codes}): [{int(chosen.min())}, {int(chosen.max())}]")
    x_rows = x.detach().cpu()[rows]
    codebook = codebook.detach().cpu()
    best = oracle.indices(x_rows, codebook)
    x64, e64 = x_rows.double(), codebook.double()
    d_chosen = ((x64 - e64[chosen]) ** 2).sum(1)
    d_best = ((x64 - e64[best]) ** 2).sum(1)
    slack = 2 * (x.shape[1] + 2) * UNIT_ROUNDOFF * ((x64 ** 2).sum(1) + 2 * (e64 ** 2).sum(1).max())
    excess = (d_chosen - d_best) / slack.clamp_min(1e-30)
    passed = int((excess <= 1.0).sum())
    return Verdict(len(rows), passed, float(excess.max()) if len(rows) else 0.0)


def judge_gather(quantized: Tensor, codebook: Tensor, indices: Tensor, rows: Tensor) -> str:
    """'' if quantized[rows] == codebook[indices[rows]] exactly, else what differs."""
    got = quantized.detach().cpu()[rows]
    expected = codebook.detach().cpu()[indices.detach().cpu().long()[rows]].to(got.dtype)
    if got.shape != expected.shape:
        return f"quantized rows have shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if not torch.equal(got, expected):
        bad = int((got != expected).any(1).sum())
        return f"quantized != codebook[indices] on {bad} of {len(rows)} checked rows"
    return ""


def exact_inertia(x: Tensor, centroids: Tensor, chunk_rows: int = 4096) -> float:
    """Σ_i min_k ‖x_i − c_k‖², in float64 (the expansion is exact enough at this precision)."""
    x64, c64 = x.detach().double(), centroids.detach().double()
    c_sq = (c64 ** 2).sum(1)
    total = 0.0
    for start in range(0, x64.shape[0], chunk_rows):
        block = x64[start:start + chunk_rows]
        dist = torch.addmm(c_sq, block, c64.T, alpha=-2.0) + (block ** 2).sum(1, keepdim=True)
        total += float(dist.min(1).values.clamp_min(0).sum())
    return total
