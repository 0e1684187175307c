"""k-means seeding: k-means++ (D² sampling) in blocks, or k rows at random, over the rows of one process or
of a process group (kmeans_distributed.Shards).

k-means++ runs on a pool of at most max(SEEDING_POINTS_PER_CENTROID · k, SEEDING_POOL_MIN) rows drawn at
random from all ranks (the only rows ever gathered), the same pool on every rank. Its choice rule is the sequential one: each
centroid is a pool row drawn with probability D²(row) / Σ D², D² the squared distance to the nearest
centroid chosen so far. The distances are updated in blocks, one fused search over the pool per block of
new centroids, instead of one pass per centroid; within a block the draws stay exact by rejection: a row
is proposed from the D² of the last update (D²_old ≥ D²) and kept with probability D²/D²_old, D² being
D²_old lowered by the block's centroids so far (a few rows: a small pairwise distance matrix). Kept rows
follow D² sampling exactly (Arthur & Vassilvitskii's rule; the rejection step as in Bachem et al. 2016).
"""
from __future__ import annotations

import numpy
import torch
from torch import Tensor

from . import ops
from .kmeans_distributed import Shards

try:
    from . import _cpu
except ImportError:  # no cpu extension: the numpy loop
    _cpu = None

# The pool k-means++ draws from. Seeding costs about one fused search of the pool against the k seeds (in
# blocks), pool / N of a Lloyd iteration: 1/8 at the benchmark's 32768 x 1024 (plus a fixed cost per block).
SEEDING_POINTS_PER_CENTROID = 4
SEEDING_POOL_MIN = 4096  # small k: a pool this large costs little and finds small clusters
MAX_BLOCK = 128  # centroids per distance update (the blocks grow 1, 2, 4, ... up to this)


def distinct_rows(num_rows: int, num: int, generator: torch.Generator, device) -> Tensor:
    """``num`` <= num_rows distinct indices in [0, num_rows), a uniform random draw, in draw order; memory
    O(num) when num_rows is much larger (the global row count of a process group can be)."""
    if 4 * num >= num_rows:
        return torch.randperm(num_rows, generator=generator, device=device)[:num]
    kept = torch.empty(0, dtype=torch.int64, device=device)
    while kept.numel() < num:  # draws with replacement; repeats are dropped, keeping the first in draw order
        drawn = torch.cat([kept, torch.randint(num_rows, (2 * num,), generator=generator, device=device)])
        values, inverse = torch.unique(drawn, return_inverse=True)
        first = torch.full_like(values, drawn.numel()).scatter_reduce_(
            0, inverse, torch.arange(drawn.numel(), device=device), "amin")
        kept = drawn[first.sort().values]
    return kept[:num]


def seed_centroids(x: Tensor, k: int, *, generator: torch.Generator, init: str = "kmeans++",
                   backend: str = "auto", shards: Shards | None = None) -> Tensor:
    """k initial centroids (k, d) among the rows of x (this rank's rows of ``shards``), the same on every
    rank: k-means++ on the pool, or k distinct rows uniformly at random (all rows, then repeats, for N < k)."""
    shards = shards or Shards(x.shape[0], x.shape[1], x.device)
    num_rows = shards.total
    if init == "random":
        chosen = distinct_rows(num_rows, min(k, num_rows), generator, x.device)
        return shards.rows_at(x, chosen[torch.arange(k, device=x.device) % chosen.numel()]).clone()
    num_pool = min(num_rows, max(SEEDING_POINTS_PER_CENTROID * k, SEEDING_POOL_MIN))
    if num_pool == num_rows and shards.group is None:
        pool = x
    else:  # in global row order, so the draws below do not depend on how the rows are split
        index = torch.arange(num_rows, device=x.device) if num_pool == num_rows else (
            distinct_rows(num_rows, num_pool, generator, x.device).sort().values)
        pool = shards.rows_at(x, index)
    return kmeans_plus_plus(pool, k, generator=generator, backend=backend)


def kmeans_plus_plus(pool: Tensor, k: int, *, generator: torch.Generator, backend: str = "auto") -> Tensor:
    """k rows of pool (m, d) by D² sampling (module docstring). Once every pool row is a centroid (m < k,
    or duplicate rows), the rest are pool rows drawn uniformly."""
    num_pool, device = pool.shape[0], pool.device
    centroids = pool.new_empty((k, pool.shape[1]))
    centroids[0] = pool[torch.randint(num_pool, (1,), generator=generator, device=device)[0]]
    sqdist = ops.nearest_code(pool, centroids[:1], backend)[1]
    count = 1
    while count < k:
        block = min(k - count, count, MAX_BLOCK)
        cumulative = torch.cumsum(sqdist, 0, dtype=torch.float64)
        total = float(cumulative[-1])
        if not total > 0.0:
            rest = torch.randint(num_pool, (k - count,), generator=generator, device=device)
            centroids[count:] = pool[rest]
            break
        # Proposals from D²_old: u·Σ lands in a row's slice of the cumulative sum (a row of D² = 0 has none).
        draws = torch.rand(2, 2 * block + 8, generator=generator, device=device, dtype=torch.float64)
        proposed = torch.searchsorted(cumulative, draws[0] * total, right=True).clamp_max_(num_pool - 1)
        rows = pool[proposed]
        kept = _accept(draws[1], sqdist[proposed], rows, proposed, block)
        new = rows[kept]
        centroids[count : count + new.shape[0]] = new
        count += new.shape[0]
        torch.minimum(sqdist, ops.nearest_code(pool, new, backend)[1], out=sqdist)
    return centroids


def _accept(uniform: Tensor, old_sqdist: Tensor, rows: Tensor, proposed: Tensor, block: int) -> Tensor:
    """Proposal i is kept when uniform_i · D²_old(i) < D²(i) = min(D²_old(i), distance² to the proposals kept
    before it), at most ``block`` of them; the first is always kept (D²_old > 0). Indices of the kept ones.
    The distances come from the Gram matrix in float64 (‖a‖² + ‖b‖² − 2 a·b; 0 for a pool row proposed twice):
    the products in torch (numpy's matmul would start its own BLAS threads, which then compete with torch's for
    the cores), the sequential rule in C++, which forms only the distances it reads (csrc/cpu/kmeanspp_accept.cpp),
    or without the extension in numpy, from the whole pairwise matrix (accept_in_numpy)."""
    points = rows.double()
    gram = (points @ points.T).cpu().numpy()
    norms = (points * points).sum(1).cpu().numpy()
    pool_rows = proposed.cpu().numpy()
    uniform, old = uniform.double().cpu().numpy(), old_sqdist.double().cpu().numpy()
    if _cpu is not None:
        kept_out = numpy.empty(old.shape[0], dtype=numpy.int64)
        count = _cpu.kmeanspp_accept(gram, norms, pool_rows, uniform, old, block, kept_out)
        return torch.from_numpy(kept_out[:count]).to(old_sqdist.device)
    pairwise = norms[:, None] + norms[None, :] - 2.0 * gram
    pairwise[pool_rows[:, None] == pool_rows[None, :]] = 0.0
    kept = accept_in_numpy(pairwise, uniform * old, old, block)
    return torch.tensor(kept, dtype=torch.int64, device=old_sqdist.device)


def accept_in_numpy(pairwise, threshold, old, block: int) -> list[int]:
    """_accept's sequential rule on the whole pairwise matrix, one Python step per proposal (without the cpu
    extension)."""
    current, kept = old.copy(), []
    for i in range(old.shape[0]):
        if threshold[i] < current[i]:
            kept.append(i)
            if len(kept) == block:
                break
            numpy.minimum(current, pairwise[i], out=current)
    return kept
