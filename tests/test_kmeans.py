"""fastvq.kmeans: Lloyd's algorithm on the fused kernels, against plain torch and faiss; its seeding's draws
(exact D² sampling in blocks). Over a process group: tests/test_kmeans_distributed.py."""
from __future__ import annotations

import collections
import itertools

import numpy
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvq
from fastvq import reference
from fastvq.kmeans import fit, seed_centroids
from fastvq import kmeans_seeding
from fastvq.kmeans_seeding import distinct_rows, kmeans_plus_plus
from fastvq.numerics import finite_rows

from conftest import TOLERANCES, to_cpu


def blobs(num_rows, dim, num_centres, seed=0, spread=1.0):
    generator = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(num_centres, dim, generator=generator)
    labels = torch.randint(0, num_centres, (num_rows,), generator=generator)
    return centres[labels] + spread * torch.randn(num_rows, dim, generator=generator)


def inertia(x, centroids):
    _, sqdist = reference.nearest_code(x.double(), centroids.double())
    return float(sqdist.double().sum())


def plain_lloyd(x, centroids, iters):
    """Lloyd's algorithm with an explicit (N, K) distance matrix; fails loudly on an empty cluster."""
    x, centroids = x.double(), centroids.double()
    for _ in range(iters):
        assignments = torch.cdist(x, centroids).argmin(1)
        counts = torch.bincount(assignments, minlength=centroids.shape[0])
        assert bool((counts > 0).all()), "the fixture must not produce empty clusters"
        centroids = torch.zeros_like(centroids).index_add_(0, assignments, x) / counts[:, None]
    return centroids


def test_lloyd_iterations_match_plain_torch_from_the_same_seeds(pair):
    # On every (backend, device) pair: the seeds come from the pair's device generator, the check on the CPU.
    x = blobs(2000, 8, 12, seed=1)
    seeds, _ = to_cpu(*fastvq.kmeans(pair.to(x), 12, iters=0, seed=3, backend=pair.backend))
    centroids, assignments = to_cpu(*fastvq.kmeans(pair.to(x), 12, iters=6, seed=3, backend=pair.backend))
    expected = plain_lloyd(x, seeds, 6)
    torch.testing.assert_close(centroids.double(), expected, **TOLERANCES["centroids"])
    want_assignments, _ = reference.nearest_code(x, centroids)
    torch.testing.assert_close(assignments, want_assignments, rtol=0, atol=0)


def test_inertia_at_most_1_02_times_faiss_with_the_same_iterations():
    faiss = pytest.importorskip("faiss")
    x = blobs(6000, 16, 48, seed=2, spread=1.5)
    ours, theirs = [], []
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # quality, not speed, is judged here
    try:
        for seed in range(3):
            centroids, _ = fastvq.kmeans(x, 32, iters=10, seed=seed)
            ours.append(inertia(x, centroids))
            reference_kmeans = faiss.Kmeans(16, 32, niter=10, seed=seed + 1, max_points_per_centroid=10**6)
            reference_kmeans.train(x.numpy())
            theirs.append(inertia(x, torch.from_numpy(reference_kmeans.centroids)))
    finally:
        faiss.omp_set_num_threads(threads)
    assert sum(ours) <= 1.02 * sum(theirs), (ours, theirs)
    assert max(ours) <= 1.05 * min(theirs), (ours, theirs)


def test_deterministic_for_a_seed_and_different_across_seeds():
    x = blobs(3000, 5, 20, seed=4)
    first = fastvq.kmeans(x, 17, iters=4, seed=11)
    again = fastvq.kmeans(x, 17, iters=4, seed=11)
    other = fastvq.kmeans(x, 17, iters=4, seed=12)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_kmeans_keeps_nothing_of_x_once_it_returns():
    # Its hinted searches key x's int8 rows on the cpu backend, which pins x's storage (the pack cache's pins,
    # which keep a storage alive): fit releases both, so x's memory goes when the caller drops x.
    from fastvq.backends import cpu as cpu_backend
    x = torch.randn(3000, 64, generator=torch.Generator().manual_seed(0))
    storage = x.untyped_storage().data_ptr()
    fastvq.kmeans(x, 64, iters=3, seed=0)
    assert not any(t.untyped_storage().data_ptr() == storage for t, _ in cpu_backend._pins.values())


def test_kmeans_plus_plus_seeds_spread_over_separated_clusters():
    # 10 tight, far-apart clusters: D² sampling finds each with near certainty, random init rarely does.
    x = blobs(5000, 6, 10, seed=5, spread=0.01)
    seeds = seed_centroids(x, 10, generator=torch.Generator().manual_seed(0), init="kmeans++")
    nearest_centre, _ = reference.nearest_code(seeds, fastvq.kmeans(x, 10, iters=5, seed=0)[0])
    assert len(set(nearest_centre.tolist())) == 10
    assert inertia(x, seeds) < 0.02 * inertia(x, x[:1])


def _kmeans_plus_plus_set_probabilities(points, k):
    """P(the k seeds are this set of rows) under sequential D² sampling, by enumerating every order."""
    sqdist = torch.cdist(points.double(), points.double()).square()
    probabilities = collections.Counter()
    for order in itertools.permutations(range(points.shape[0]), k):
        probability, nearest = 1.0 / points.shape[0], sqdist[order[0]].clone()
        for row in order[1:]:
            probability *= float(nearest[row] / nearest.sum())
            nearest = torch.minimum(nearest, sqdist[row])
        probabilities[frozenset(order)] += probability
    return probabilities


def test_blocked_kmeans_plus_plus_draws_exactly_as_sequential_d2_sampling():
    # 6 rows, 4 seeds: the 3rd and 4th come from one block (rejection against the 3rd). 2000 draws from a fixed
    # seed: total variation to the exact law 0.023 here; keeping every proposal (no rejection) gives 0.15.
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0], [16.0]])
    exact = _kmeans_plus_plus_set_probabilities(points, 4)
    generator, draws, seen = torch.Generator().manual_seed(0), 2000, collections.Counter()
    for _ in range(draws):
        seeds = kmeans_plus_plus(points, 4, generator=generator)
        seen[frozenset((seeds == points.T).nonzero()[:, 1].tolist())] += 1
    assert set(seen) <= set(exact)
    assert 0.5 * sum(abs(seen[s] / draws - p) for s, p in exact.items()) < 0.06


@pytest.mark.parametrize("seed", range(6))
def test_the_acceptance_rule_in_cpp_keeps_what_the_numpy_loop_keeps(seed):
    # Close proposals (so that kept ones lower the others' D2), repeated pool rows and every block size.
    if kmeans_seeding._cpu is None:
        pytest.skip("no cpu extension: the numpy loop is the only one")
    g = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 120, (1,), generator=g))
    rows = torch.randn(count, 3, generator=g) * (0.2 + 2 * float(torch.rand(1, generator=g)))
    proposed = torch.randint(0, max(1, count // 2), (count,), generator=g)
    rows = rows[proposed]  # a pool row proposed twice is the same row
    old = (torch.rand(count, generator=g, dtype=torch.float64) * 8 + 0.01).float()
    uniform = torch.rand(count, generator=g, dtype=torch.float64)
    for block in (1, 2, count // 3 + 1, count):
        kept = kmeans_seeding._accept(uniform, old, rows, proposed, block)
        points = rows.double()
        norms = (points * points).sum(1).numpy()
        pairwise = norms[:, None] + norms[None, :] - 2.0 * (points @ points.T).numpy()
        index = proposed.numpy()
        pairwise[index[:, None] == index[None, :]] = 0.0
        threshold = uniform.numpy() * old.double().numpy()
        want = kmeans_seeding.accept_in_numpy(pairwise, threshold, old.double().numpy(), block)
        assert kept.tolist() == want and 1 <= len(want) <= block
    assert len(want) < count  # the rule rejected some: the comparison is not vacuous


@pytest.mark.parametrize("rule", ["cpp", "numpy"])
def test_a_pool_row_proposed_twice_is_kept_once(rule, monkeypatch):
    if rule == "numpy":
        monkeypatch.setattr(kmeans_seeding, "_cpu", None)
    elif kmeans_seeding._cpu is None:
        pytest.skip("no cpu extension")
    # Far from the origin, at d = 64, the Gram formula leaves ~0.1 of rounding where a row meets itself: only
    # the rule that a pool row is at distance 0 from itself rejects the second proposal of it.
    base = 1e6 + torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    proposed = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7])
    uniform = torch.full((16,), 1e-9, dtype=torch.float64)
    kept = kmeans_seeding._accept(uniform, torch.ones(16), base[proposed], proposed, 16)
    assert proposed[kept].tolist() == list(range(8))


def test_the_acceptance_binding_checks_its_arrays():
    if kmeans_seeding._cpu is None:
        pytest.skip("no cpu extension")
    accept = kmeans_seeding._cpu.kmeanspp_accept
    gram, vector, rows, kept = numpy.zeros((4, 4)), numpy.zeros(4), numpy.arange(4), numpy.zeros(4, dtype=numpy.int64)
    with pytest.raises(ValueError, match=r"gram .*\(P, P\)"):
        accept(numpy.zeros((4, 3)), vector, rows, vector, vector, 2, kept)
    with pytest.raises(ValueError, match=r"pool_rows .*\(P,\)"):
        accept(gram, vector, numpy.arange(3), vector, vector, 2, kept)
    with pytest.raises((ValueError, TypeError), match="uniform must have dtype float64, got float32"):
        accept(gram, vector, rows, numpy.zeros(4, dtype=numpy.float32), vector, 2, kept)
    with pytest.raises(ValueError, match="block must be >= 0, got -1"):
        accept(gram, vector, rows, vector, vector, -1, kept)


def test_kmeans_plus_plus_updates_distances_in_blocks(monkeypatch):
    """One fused search over the pool per block of new seeds, not one per seed; the pool is bounded."""
    calls = []
    search = kmeans_seeding.ops.nearest_code
    monkeypatch.setattr(kmeans_seeding.ops, "nearest_code", lambda x, e, b: calls.append(x.shape[0]) or search(x, e, b))
    x, k = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0)), 1280
    seeds = seed_centroids(x, k, generator=torch.Generator().manual_seed(1))
    assert seeds.shape == (k, 8) and torch.unique(seeds, dim=0).shape[0] == k
    pool = max(kmeans_seeding.SEEDING_POINTS_PER_CENTROID * k, kmeans_seeding.SEEDING_POOL_MIN)
    assert len(calls) <= k // 16 and set(calls) == {pool} and pool < x.shape[0], (calls, pool)


def test_each_lloyd_search_starts_from_the_last_assignment_and_the_result_does_not_depend_on_it(monkeypatch):
    x, k = blobs(3000, 48, 20, seed=4), 64
    hinted = fastvq.kmeans(x, k, iters=4, seed=2)
    hints, answers = [], []
    search = kmeans_seeding.ops.nearest_code

    def without_hint(x, e, b, hint=None):  # records the hint, searches without it
        out = search(x, e, b)
        if e.shape[0] == k:  # a Lloyd search (the seeding's are against blocks of fewer seeds)
            hints.append(hint)
            answers.append(out[0])
        return out

    monkeypatch.setattr(kmeans_seeding.ops, "nearest_code", without_hint)
    plain = fastvq.kmeans(x, k, iters=4, seed=2)
    torch.testing.assert_close(hinted, plain, rtol=0, atol=0)
    assert len(hints) == 5 and hints[0] is None
    for hint, last in zip(hints[1:], answers):
        assert hint is last


@pytest.mark.parametrize("num_rows,num", [(10, 10), (10, 3), (100000, 5000), (2**40, 1000)])
def test_distinct_rows_are_distinct_in_range_and_reproducible(num_rows, num):
    rows = distinct_rows(num_rows, num, torch.Generator().manual_seed(3), "cpu")
    assert rows.shape == (num,) and int(rows.min()) >= 0 and int(rows.max()) < num_rows
    assert torch.unique(rows).numel() == num
    assert torch.equal(rows, distinct_rows(num_rows, num, torch.Generator().manual_seed(3), "cpu"))
    if num_rows == 100000:  # uniform: each tenth of the range gets its share (binomial sd ~ 21)
        shares = torch.bincount(rows // 10000, minlength=10)
        assert int((shares - num / 10).abs().max()) < 120, shares


def test_empty_clusters_are_reseeded_from_far_points():
    # Four distinct points, one of them 60 times: random seeds are mostly copies of it, so
    # clusters start empty; re-seeding from the farthest points must find all four.
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([points[:1].repeat(60, 1), points[1:]])
    for seed in range(4):
        centroids, assignments = fastvq.kmeans(x, 4, iters=5, seed=seed, init="random")
        assert inertia(x, centroids) == 0.0, (seed, centroids)
        assert len(set(assignments.tolist())) == 4


def test_finite_rows_flags_each_row_with_a_nan_or_inf_and_no_other():
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    x[1, 2], x[3, 0], x[5, 3] = float("nan"), float("inf"), -float("inf")
    x[6, :2] = torch.tensor([float("inf"), -float("inf")])  # sums to NaN
    x[7] = 3e38  # finite entries whose sum overflows to inf
    want = torch.isfinite(x).all(dim=1)
    assert torch.equal(finite_rows(x), want) and want.tolist().count(False) == 4
    assert torch.equal(finite_rows(x[[0, 7]]), torch.tensor([True, True]))
    assert finite_rows(x[:0]).shape == (0,)


def test_fewer_rows_than_clusters_gives_duplicate_rows():
    x = torch.randn(3, 4)
    centroids, assignments = fastvq.kmeans(x, 7, iters=3)
    assert centroids.shape == (7, 4)
    assert inertia(x, centroids) == 0.0
    for row in centroids:  # every centroid is one of the rows
        assert bool(((x - row).abs().sum(1) == 0).any())
    torch.testing.assert_close(x, centroids[assignments], rtol=0, atol=0)


@pytest.mark.parametrize("num_rows,dim,k", [(1, 1, 1), (3, 3, 3), (33, 1, 3), (257, 33, 1), (1030, 3, 33)])
def test_odd_shapes_and_non_contiguous_input(num_rows, dim, k):
    base = torch.randn(dim, num_rows, generator=torch.Generator().manual_seed(num_rows))
    x = base.t()  # non-contiguous (N, d)
    centroids, assignments = fastvq.kmeans(x, k, iters=3)
    assert centroids.shape == (k, dim) and assignments.shape == (num_rows,) and assignments.dtype == torch.int64
    want, _ = reference.nearest_code(x, centroids)
    torch.testing.assert_close(assignments, want, rtol=0, atol=0)
    same = fastvq.kmeans(x.contiguous(), k, iters=3)
    torch.testing.assert_close(centroids, same[0], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    x = blobs(500, 4, 5, seed=6).to(dtype)
    centroids, assignments = fastvq.kmeans(x, 5, iters=4)
    assert centroids.dtype == dtype
    want = fastvq.kmeans(x.float(), 5, iters=4)[0]
    torch.testing.assert_close(centroids.float(), want.to(dtype).float(), **TOLERANCES[dtype])


def test_spherical_fit_keeps_unit_centroids():
    x = torch.nn.functional.normalize(blobs(800, 6, 8, seed=7), dim=-1)
    result = fit(x, 8, iters=5, generator=torch.Generator().manual_seed(0), spherical=True)
    torch.testing.assert_close(result.centroids.norm(dim=-1), torch.ones(8), **TOLERANCES[torch.float32])
    assert float(result.counts.sum()) == 800


class _LargestAllocation(TorchDispatchMode):
    """Largest tensor any top-level op returns (fastvq's custom ops count as one op each)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_no_n_by_k_tensor_outside_the_kernels(init):
    num_rows, dim, k = 3000, 4, 200  # N·K = 600k elements; x is 12k
    x = torch.randn(num_rows, dim)
    with _LargestAllocation() as mode:
        fastvq.kmeans(x, k, iters=2, init=init)
    assert mode.largest <= 4 * num_rows * dim, mode.largest


@pytest.mark.parametrize(
    "args,kwargs,error,pattern",
    [
        ((torch.randn(0, 3), 2), {}, ValueError, r"x must have shape \(N, d\) with N >= 1, got \(0, 3\)"),
        ((torch.randn(5), 2), {}, ValueError, r"x must have shape \(N, d\)"),
        ((torch.ones(5, 2, dtype=torch.int64), 2), {}, TypeError, "x must be a floating-point tensor"),
        ((torch.randn(5, 2), 0), {}, ValueError, "k must be an int >= 1, got 0"),
        ((torch.randn(5, 2), 2.0), {}, TypeError, "k must be an int"),
        ((torch.randn(5, 2), 2), {"iters": -1}, ValueError, "iters must be an int >= 0"),
        ((torch.randn(5, 2), 2), {"init": "kmeans||"}, ValueError, "init must be one of 'kmeans\\+\\+', 'random'"),
        ((torch.randn(5, 2), 2), {"process_group": True}, TypeError,
         "process_group must be a torch.distributed.ProcessGroup .* or None, got bool"),
    ],
)
def test_bad_arguments(args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        fastvq.kmeans(*args, **kwargs)
