"""Correctness before timing, by fastvq.reference's one judge, on an evenly spread subset of rows
(the direct-difference oracle is slow). Approximate providers (faiss IVF) get a recall@1 against a
float64 expansion, exact enough and fast enough for many more rows."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference

CHECK_ELEMENTS, MIN_ROWS, MAX_ROWS, RECALL_ROWS = 1 << 26, 32, 512, 1024  # the oracle's (rows, K, d) work ~ 2^26


class Wrong(Exception):
    """A provider's answer is wrong; the message says how."""


def spread(n: int, count: int) -> Tensor:
    return torch.linspace(0, n - 1, min(n, count)).round().long().unique() if n else torch.zeros(0, dtype=torch.long)


def check_rows(n: int, k: int, d: int) -> Tensor:
    return spread(n, max(MIN_ROWS, min(MAX_ROWS, CHECK_ELEMENTS // max(1, k * d))))


def oracle(x: Tensor, codebook: Tensor, rows: Tensor) -> Tensor:
    """reference.nearest_code on the checked rows (float32, direct differences)."""
    return reference.nearest_code(x.detach().cpu().float()[rows], codebook.detach().cpu().float())[0]


def excess(x: Tensor, codebook: Tensor, indices, rows: Tensor, best: Tensor | None = None) -> Tensor:
    """reference.nearest_code_excess of indices[rows] (a row passes when <= 1); Wrong if malformed."""
    indices = torch.as_tensor(indices).reshape(-1)
    if indices.shape != (x.shape[0],) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise Wrong(f"indices must be an integer tensor of shape ({x.shape[0]},), "
                    f"got {indices.dtype} {tuple(indices.shape)}")
    chosen = indices.detach().cpu().long()[rows]
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= codebook.shape[0]):
        raise Wrong(f"indices out of range [0, {codebook.shape[0]}): [{int(chosen.min())}, {int(chosen.max())}]")
    best = oracle(x, codebook, rows) if best is None else best
    return reference.nearest_code_excess(x.detach().cpu().float()[rows], codebook.detach().cpu().float(), chosen, best)


def check_nearest(x: Tensor, codebook: Tensor, indices, rows: Tensor, best: Tensor | None = None) -> None:
    found = excess(x, codebook, indices, rows, best)
    if bool((found > 1.0).any()):
        raise Wrong(f"{int((found > 1.0).sum())} of {len(rows)} checked rows are not a nearest code "
                    f"(worst: {float(found.max()):.3g}× the float32 rounding slack above the minimum)")


def check_gather(quantized: Tensor, codebook: Tensor, indices: Tensor, rows: Tensor) -> None:
    """quantized[rows] == codebook[indices[rows]], up to one rounding (straight-through outputs are x + (e − x))."""
    got = quantized.detach().cpu().reshape(-1, codebook.shape[1])[rows].float()
    want = codebook.detach().cpu()[indices.detach().cpu().reshape(-1)[rows]].float()
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max().clamp_min(1.0))):
        raise Wrong(f"quantized != codebook[indices] on {int((~torch.isclose(got, want)).any(1).sum())} checked rows")


def exact_nearest(x: Tensor, codebook: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(min distance, argmin) per row by a float64 ‖x‖² − 2x·e + ‖e‖² expansion: for recall and inertia."""
    x64, e64 = x.detach().cpu().double(), codebook.detach().cpu().double()
    parts = [(torch.addmm((e64 ** 2).sum(1), b, e64.T, alpha=-2.0) + (b ** 2).sum(1, keepdim=True)).min(1)
             for b in x64.split(chunk)]
    return torch.cat([p.values for p in parts]).clamp_min(0), torch.cat([p.indices for p in parts])


def recall(x: Tensor, codebook: Tensor, indices) -> tuple[float, int]:
    """(recall@1, rows scored) on up to RECALL_ROWS evenly spread rows."""
    rows = spread(x.shape[0], RECALL_ROWS)
    best = exact_nearest(x.detach().cpu()[rows], codebook)[1]
    return float((excess(x, codebook, indices, rows, best) <= 1.0).double().mean()), len(rows)


def inertia(x: Tensor, centroids: Tensor) -> float:
    """Σ_i min_k ‖x_i − c_k‖², float64."""
    return float(exact_nearest(x, centroids)[0].sum())
