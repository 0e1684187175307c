"""fastvq.kmeans over a torch.distributed process group: 2 and 3 gloo processes on CPU, spawned once per world size.

Each rank clusters its shard of a global x (uneven shards, a rank with no rows); the tests compare what every
rank got with one process given all the rows, same seed. On integer-valued rows every sum over ranks is exact,
so the two must agree bit for bit; on real-valued rows up to the rounding of those sums. Errors that depend on
the data (no row anywhere, d differing between ranks) must be raised on every rank, never leave one waiting.
A rendezvous file and a 60 s collective timeout mean a hang fails instead of blocking.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastvq
from fastvq import reference

from conftest import TOLERANCES


def integer_blobs(num_rows, dim, num_centres, seed):
    """Integer-valued rows: counts and sums over any split of them are exact in float32."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randint(-40, 41, (num_centres, dim), generator=generator)
    labels = torch.randint(0, num_centres, (num_rows,), generator=generator)
    return (centres[labels] + torch.randint(-3, 4, (num_rows, dim), generator=generator)).float()


def real_blobs(num_rows, dim, num_centres, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = 6 * torch.randn(num_centres, dim, generator=generator)
    labels = torch.randint(0, num_centres, (num_rows,), generator=generator)
    return centres[labels] + torch.randn(num_rows, dim, generator=generator)


def with_non_finite_rows(x):
    x = x.clone()
    x[3, 0], x[10, 2], x[-1, 1] = float("nan"), float("inf"), -float("inf")
    return x


def far_and_duplicate_points():
    """Four distinct points, one of them 60 times: random seeds are mostly copies of it, so clusters start
    empty and are re-seeded from the farthest rows, which may sit on any rank."""
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    return torch.cat([points[:1].repeat(30, 1), points[1:2], points[:1].repeat(30, 1), points[2:]])


# name: (global rows, k, kmeans kwargs, shard sizes per world size; None = an even split)
SCENARIOS = {
    "integer-kmeans++": (lambda: integer_blobs(1033, 7, 19, seed=1), 17, dict(iters=6, seed=5),
                         {2: [700, 333], 3: [500, 0, 533]}),
    "integer-random-init": (lambda: integer_blobs(257, 3, 5, seed=2), 9, dict(iters=4, seed=1, init="random"),
                            {2: [0, 257], 3: [1, 255, 1]}),
    "integer-non-finite": (lambda: with_non_finite_rows(integer_blobs(300, 4, 6, seed=3)), 6, dict(iters=5, seed=2),
                           {2: [150, 150], 3: [11, 0, 289]}),
    "empty-clusters-reseeded": (far_and_duplicate_points, 4, dict(iters=5, seed=3, init="random"),
                                {2: [31, 33], 3: [20, 20, 24]}),
    "fewer-rows-than-clusters": (lambda: integer_blobs(5, 3, 2, seed=4), 8, dict(iters=3, seed=0),
                                 {2: [0, 5], 3: [2, 0, 3]}),
    "sampled-pool": (lambda: integer_blobs(20000, 4, 40, seed=6), 48, dict(iters=3, seed=7),  # a pool of 4096 rows
                     {2: [9000, 11000], 3: [7000, 6999, 6001]}),
    "real-valued": (lambda: real_blobs(2000, 5, 12, seed=5), 12, dict(iters=8, seed=9),
                    {2: [1200, 800], 3: [0, 1000, 1000]}),
}


def shard(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def run_scenarios(rank, world):
    results = {}
    for name, (make, k, kwargs, splits) in SCENARIOS.items():
        x = shard(make(), splits[world], rank)
        results[name] = fastvq.kmeans(x, k, process_group=dist.group.WORLD, **kwargs)
    errors = {}
    for name, x in {"no-rows-anywhere": torch.empty(0, 3), "no-finite-row": torch.full((2, 3), float("nan")),
                    "d-differs": torch.randn(4, 3 + (rank == world - 1))}.items():
        try:
            fastvq.kmeans(x, 2, process_group=dist.group.WORLD)
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    results["errors"] = errors
    return results


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    # Loopback: left to itself gloo binds to whatever the hostname resolves to, which on a sandboxed CI machine
    # need not be loopback; a rank there once died of SIGABRT (gloo aborts on a transport error).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(run_scenarios(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank closes its sockets while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"{world}-ranks")
def ranks(request, tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"kmeans{world}")
    mp.spawn(worker, args=(world, str(out_dir / "rendezvous"), str(out_dir)), nprocs=world, join=True)
    return world, [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.mark.parametrize("name", [name for name in SCENARIOS if name != "real-valued"])
def test_ranks_get_exactly_the_single_process_result(ranks, name):
    world, results = ranks
    make, k, kwargs, splits = SCENARIOS[name]
    x = make()
    centroids, assignments = fastvq.kmeans(x, k, **kwargs)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result[name][0], centroids, rtol=0, atol=0, msg=f"rank {rank} centroids")
        mine = shard(assignments, splits[world], rank)
        torch.testing.assert_close(result[name][1], mine, rtol=0, atol=0, msg=f"rank {rank} assignments")


def test_real_valued_rows_match_up_to_the_rounding_of_the_sums(ranks):
    world, results = ranks
    make, k, kwargs, splits = SCENARIOS["real-valued"]
    x = make()
    centroids, assignments = fastvq.kmeans(x, k, **kwargs)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["real-valued"][0], centroids, **TOLERANCES["centroids"])
        torch.testing.assert_close(result["real-valued"][0], results[0]["real-valued"][0], rtol=0, atol=0)
        want, _ = reference.nearest_code(shard(x, splits[world], rank), result["real-valued"][0])
        torch.testing.assert_close(result["real-valued"][1], want, rtol=0, atol=0)


def test_reseeding_found_every_far_point_on_every_rank(ranks):
    _, results = ranks
    for result in results:
        centroids = result["empty-clusters-reseeded"][0]
        assert sorted(map(tuple, centroids.tolist())) == [(0.0, 0.0), (0.0, 10.0), (10.0, 0.0), (10.0, 10.0)]


def test_data_dependent_errors_are_raised_on_every_rank(ranks):
    _, results = ranks
    for result in results:
        errors = result["errors"]
        assert errors["no-rows-anywhere"].startswith("x must have at least one row on some rank")
        assert errors["no-finite-row"].startswith("x must have at least one finite row")
        assert errors["d-differs"].startswith("x must have the same number of columns d on every rank")
