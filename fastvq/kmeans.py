"""k-means (Lloyd's algorithm) on fastvq's fused kernels: no N×K matrix at any step.

- assignment: ``ops.nearest_code`` (fused search, returns each row's squared distance), given the last
  assignment as a hint (the CPU's int8 prefilter starts from it; the result does not depend on it);
- update: ``ops.ema_stats`` (per-cluster counts and sums in one pass);
- seeding: k-means++ with its distance updates in blocks, or random rows (kmeans_seeding.py);
- an empty cluster is re-seeded with the point farthest from its centroid (taken
  from clusters that keep at least one other point).

All randomness comes from one ``torch.Generator`` seeded with ``seed``, and the
kernels are deterministic, so a seed gives the same result every time. With a
``process_group`` each rank holds a shard of the rows; counts and sums are summed
over the ranks every iteration (kmeans_distributed.py), and the result is the one
a single process given every row computes, up to the rounding of those sums.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .dispatch import release
from .numerics import compute_dtype, finite_rows
from .checks import check_columns, check_float_tensor, shape_str
from .kmeans_distributed import Shards
from .kmeans_seeding import seed_centroids

INITS = ("kmeans++", "random")


class KMeansResult(NamedTuple):
    centroids: Tensor  # (k, d) float32 (float64 for float64 input)
    assignments: Tensor  # (N,) int64, nearest centroid of each point (this rank's points)
    sqdist: Tensor  # (N,) squared distance to it, float32 (float64 for float64 input)
    counts: Tensor  # (k,) float32 points per centroid (over every rank)


def kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 10,
    seed: int = 0,
    init: str = "kmeans++",
    backend: str = "auto",
    process_group=None,
) -> tuple[Tensor, Tensor]:
    """Cluster the rows of x (N, d) into k clusters with Lloyd's algorithm.

    Returns ``(centroids, assignments)``: centroids (k, d) in x's dtype and
    assignments int64 (N,), the nearest centroid of each row (ties to the lowest
    index), consistent with the returned centroids. ``init`` is "kmeans++"
    (D² sampling) or "random" (k distinct rows). With fewer rows than clusters
    (N < k) some centroids are duplicate rows. Deterministic for a given seed.

    Rows with a NaN or Inf are left out of the clustering (never a seed, never in a mean), so
    the finite rows get exactly the result they get without them; those rows are assigned
    index 0, the rule of ``nearest_code`` for a non-finite row.

    ``process_group`` (a ``torch.distributed`` group, e.g. ``torch.distributed.group.WORLD``;
    None: this process alone): every rank of the group calls ``kmeans`` with its own rows
    (any number, 0 included) and the same k, iters, seed and init, and gets the same centroids,
    those of one process given the ranks' rows concatenated in rank order (up to the float
    rounding of the sums over ranks), and the assignments of its own rows. Only the k-means++
    pool (at most max(4·k, 4096) rows) and re-seeded rows travel between ranks, never the shards.
    """
    check_float_tensor("x", x)
    if x.dim() != 2 or (x.shape[0] == 0 and process_group is None):
        raise ValueError(f"x must have shape (N, d) with N >= 1, got {shape_str(x.shape)}")
    check_columns("x", x)
    _check_int("k", k, low=1)
    _check_int("iters", iters, low=0)
    _check_int("seed", seed, low=None)
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD) "
                        f"or None, got {type(process_group).__name__}")
    finite = finite_rows(x)
    all_finite = bool(finite.all())
    rows = x if all_finite else x[finite]
    # Past this point every rank takes the same branches: they depend on the shared counts only.
    shards = Shards(rows.shape[0], x.shape[1], x.device, process_group, extra=x.shape[0])
    if shards.total == 0 and sum(shards.extras) == 0:
        raise ValueError(f"x must have at least one row on some rank, got shapes with N = {shards.extras}")
    if shards.total == 0:
        raise ValueError(f"x must have at least one finite row, got {shape_str(x.shape)} with a NaN or Inf in every row"
                         + (" (on every rank)" if process_group is not None else ""))
    generator = torch.Generator(device=x.device).manual_seed(seed)
    result = fit(rows, k, iters=iters, generator=generator, init=init, backend=backend, shards=shards)
    if all_finite:
        return result.centroids.to(x.dtype), result.assignments
    assignments = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    assignments[finite] = result.assignments
    return result.centroids.to(x.dtype), assignments


def fit(
    x: Tensor,
    k: int,
    *,
    iters: int,
    generator: torch.Generator,
    init: str = "kmeans++",
    backend: str = "auto",
    spherical: bool = False,
    shards: Shards | None = None,
) -> KMeansResult:
    """Lloyd's algorithm on validated, finite x (N, d): N >= 1, or this rank's rows of ``shards``.
    ``spherical`` keeps centroids unit-norm (for l2-normalised x: cosine-similarity k-means)."""
    x = x.to(compute_dtype(x.dtype))
    shards = shards or Shards(x.shape[0], x.shape[1], x.device)
    centroids = seed_centroids(x, k, generator=generator, init=init, backend=backend, shards=shards)
    if spherical:
        centroids = F.normalize(centroids, dim=-1)
    try:
        return _lloyd(x, centroids, k, iters=iters, backend=backend, spherical=spherical, shards=shards)
    finally:  # the hinted searches keyed x's int8 rows (and pinned x): none of it outlives the fit
        release(x)


def _lloyd(x: Tensor, centroids: Tensor, k: int, *, iters: int, backend: str, spherical: bool,
           shards: Shards) -> KMeansResult:
    """fit's iterations from its seeds."""
    assignments = None  # each search starts from the last assignment (the CPU prefilter's hint)
    for _ in range(iters):
        assignments, sqdist = ops.nearest_code(x, centroids, backend, assignments)
        counts, sums = ops.ema_stats(x, assignments, k, backend)
        counts, sums = counts.to(x.dtype), sums.to(x.dtype)
        if shards.group is not None:  # one collective for both
            stats = shards.sum_(torch.cat([counts.unsqueeze(1), sums], 1))
            counts, sums = stats[:, 0], stats[:, 1:]
        means = sums / counts.clamp_min(1.0).unsqueeze(1)
        if spherical:
            means = F.normalize(means, dim=-1)
        empty = counts == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, means)
        centroids = _reseed_empty(x, centroids, empty, counts, assignments, sqdist, shards)
    assignments, sqdist = ops.nearest_code(x, centroids, backend, assignments)
    counts = shards.sum_(torch.zeros(k, dtype=torch.float32, device=x.device).index_add_(
        0, assignments, torch.ones_like(sqdist, dtype=torch.float32)))
    return KMeansResult(centroids, assignments, sqdist, counts)


def _reseed_empty(x: Tensor, centroids: Tensor, empty: Tensor, counts: Tensor,
                  assignments: Tensor, sqdist: Tensor, shards: Shards) -> Tensor:
    """Move each empty cluster's centroid to a far point, farthest first (ties: the lower global row).

    Candidates are points whose cluster keeps at least one other point, so a
    re-seed never empties another cluster; points at distance 0 are never used.
    Each rank offers its farthest rows, padded to the same count; they are merged in rank order.
    """
    num_empty = int(empty.sum())
    if num_empty == 0:
        return centroids
    take = min(num_empty, shards.total)
    score = torch.where(counts[assignments] > 1, sqdist.to(torch.float64), -1.0)
    order = torch.sort(score, descending=True, stable=True).indices[:take]
    offered = torch.full((2, take), -1.0, dtype=torch.float64, device=x.device)
    offered[0, : order.shape[0]] = score[order]
    offered[1, : order.shape[0]] = (order + shards.offset).to(torch.float64)  # exact below 2**53 rows
    offered = shards.cat(offered.T.contiguous())  # (ranks · take, 2), each rank's part in (score ↓, row ↑) order
    best = torch.sort(offered[:, 0], descending=True, stable=True).indices[:take]
    best = best[offered[best, 0] > 0]
    targets = torch.nonzero(empty).squeeze(1)[: best.shape[0]]
    centroids = centroids.clone()
    centroids[targets] = shards.rows_at(x, offered[best, 1].to(torch.int64))
    return centroids


def _check_int(name: str, value, *, low: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
