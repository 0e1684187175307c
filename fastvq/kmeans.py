"""k-means (Lloyd's algorithm) on fastvq's fused kernels: no N×K matrix at any step.

- assignment: ``ops.nearest_code`` (fused search, returns each row's squared distance);
- update: ``ops.ema_stats`` (per-cluster counts and sums in one pass);
- k-means++ seeding keeps one running min-distance vector (N,), updated with the
  distances to each new centroid (one matrix-vector product each);
- an empty cluster is re-seeded with the point farthest from its centroid (taken
  from clusters that keep at least one other point).

All randomness comes from one ``torch.Generator`` seeded with ``seed``, and the
kernels are deterministic, so a seed gives the same result every time.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .numerics import compute_dtype
from .checks import check_columns, check_float_tensor, shape_str

INITS = ("kmeans++", "random")

# k-means++ seeding is sequential (one pass over the points per centroid), so it runs on
# at most this many points per centroid, drawn at random; Lloyd's iterations use all points.
SEEDING_POINTS_PER_CENTROID = 16


class KMeansResult(NamedTuple):
    centroids: Tensor  # (k, d) float32 (float64 for float64 input)
    assignments: Tensor  # (N,) int64, nearest centroid of each point
    sqdist: Tensor  # (N,) squared distance to it, float32 (float64 for float64 input)
    counts: Tensor  # (k,) float32 points per centroid


def kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 10,
    seed: int = 0,
    init: str = "kmeans++",
    backend: str = "auto",
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
    """
    check_float_tensor("x", x)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (N, d) with N >= 1, got {shape_str(x.shape)}")
    check_columns("x", x)
    _check_int("k", k, low=1)
    _check_int("iters", iters, low=0)
    _check_int("seed", seed, low=None)
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    finite = torch.isfinite(x).all(dim=1)
    all_finite = bool(finite.all())
    if not all_finite and not bool(finite.any()):
        raise ValueError(f"x must have at least one finite row, got {shape_str(x.shape)} with a NaN or Inf in every row")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    result = fit(x if all_finite else x[finite], k, iters=iters, generator=generator, init=init, backend=backend)
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
) -> KMeansResult:
    """Lloyd's algorithm on validated x (N >= 1, d). ``spherical`` keeps centroids unit-norm
    (for l2-normalised x: cosine-similarity k-means)."""
    x = x.to(compute_dtype(x.dtype))
    centroids = seed_centroids(x, k, generator=generator, init=init)
    if spherical:
        centroids = F.normalize(centroids, dim=-1)
    for _ in range(iters):
        assignments, sqdist = ops.nearest_code(x, centroids, backend)
        counts, sums = ops.ema_stats(x, assignments, k, backend)
        counts, sums = counts.to(x.dtype), sums.to(x.dtype)
        means = sums / counts.clamp_min(1.0).unsqueeze(1)
        if spherical:
            means = F.normalize(means, dim=-1)
        empty = counts == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, means)
        centroids = _reseed_empty(x, centroids, empty, counts, assignments, sqdist)
    assignments, sqdist = ops.nearest_code(x, centroids, backend)
    counts = torch.zeros(k, dtype=torch.float32, device=x.device).index_add_(
        0, assignments, torch.ones_like(sqdist, dtype=torch.float32)
    )
    return KMeansResult(centroids, assignments, sqdist, counts)


def seed_centroids(x: Tensor, k: int, *, generator: torch.Generator, init: str = "kmeans++") -> Tensor:
    """k initial centroids (k, d) chosen among the rows of x: k-means++ or uniformly at random."""
    num_rows = x.shape[0]
    if init == "random" or k == 1:
        return x[_sample_rows(num_rows, k, generator, x.device)].clone()
    # k-means++ on a random subset, so seeding costs O(k² · d · SEEDING_POINTS_PER_CENTROID) at most.
    num_points = min(num_rows, SEEDING_POINTS_PER_CENTROID * k)
    if num_points < num_rows:
        x = x[torch.randperm(num_rows, generator=generator, device=x.device)[:num_points]]
    sqnorms = x.square().sum(1)
    centroids = x.new_empty((k, x.shape[1]))
    chosen = torch.randint(num_points, (1,), generator=generator, device=x.device)
    min_sqdist = torch.full_like(sqnorms, torch.inf)
    for j in range(k):
        if j > 0:
            # D² sampling without a branch: u·Σ lands in point i's slice of the cumulative sum.
            # Once every point coincides with a centroid (N < k) the sum is 0 and this picks the last point.
            cumulative = torch.cumsum(min_sqdist, 0, dtype=torch.float64)
            target = torch.rand(1, generator=generator, device=x.device, dtype=torch.float64) * cumulative[-1]
            chosen = torch.searchsorted(cumulative, target, right=True).clamp_max_(num_points - 1)
        centroid = x[chosen]  # (1, d)
        centroids[j : j + 1] = centroid
        # ‖x − c‖² = ‖x‖² − 2x·c + ‖c‖²: one matrix-vector product; clamped, as rounding can go below 0.
        sqdist = torch.addmv(sqnorms + sqnorms[chosen], x, centroid[0], alpha=-2.0).clamp_min_(0.0)
        torch.minimum(min_sqdist, sqdist, out=min_sqdist)
    return centroids


def _reseed_empty(x: Tensor, centroids: Tensor, empty: Tensor, counts: Tensor,
                  assignments: Tensor, sqdist: Tensor) -> Tensor:
    """Move each empty cluster's centroid to a far point, farthest first.

    Candidates are points whose cluster keeps at least one other point, so a
    re-seed never empties another cluster; points at distance 0 are never used.
    """
    num_empty = int(empty.sum())
    if num_empty == 0:
        return centroids
    score = torch.where(counts[assignments] > 1, sqdist.to(torch.float64), -1.0)
    far_score, far_rows = torch.topk(score, min(num_empty, x.shape[0]))
    far_rows = far_rows[far_score > 0]
    targets = torch.nonzero(empty).squeeze(1)[: far_rows.shape[0]]
    centroids = centroids.clone()
    centroids[targets] = x[far_rows]
    return centroids


def _sample_rows(num_rows: int, num: int, generator: torch.Generator, device) -> Tensor:
    """num row indices: distinct when num <= num_rows, else every row then repeats."""
    perm = torch.randperm(num_rows, generator=generator, device=device)
    return perm[torch.arange(num, device=device) % num_rows]


def _check_int(name: str, value, *, low: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
