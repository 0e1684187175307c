"""Codebook sync over torch.distributed: 2 gloo processes on CPU, spawned once for the whole file.

The workers run every scenario and save what they saw; the tests below judge it.
A rendezvous file and a 60 s collective timeout mean a hang fails instead of blocking.
Where vector-quantize-pytorch defines the distributed rule (k-means seeds and dead-code rows drawn
from every rank, k-means counts and means summed over ranks), the workers also run its
VectorQuantize from the same state and seeds, and the tests compare the two.
"""
from __future__ import annotations

import datetime
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastvq import FastVectorQuantizer

from conftest import TOLERANCES

WORLD = 2
ROWS_PER_RANK = 48
DIM, CODES = 4, 12
HAVE_VQP = importlib.util.find_spec("vector_quantize_pytorch") is not None


def batches(num_batches, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(6, DIM, generator=generator)
    labels = torch.randint(0, 6, (num_batches, WORLD * ROWS_PER_RANK), generator=generator)
    return centres[labels] + 0.3 * torch.randn(num_batches, WORLD * ROWS_PER_RANK, DIM, generator=generator)


def own_half(batch, rank):
    return batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]


def state(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def ema_sync(rank):
    torch.manual_seed(0)  # the same initial codebook on every rank and in the single process
    synced = FastVectorQuantizer(DIM, CODES, decay=0.8)
    torch.manual_seed(0)
    single = FastVectorQuantizer(DIM, CODES, decay=0.8, sync_codebook=False)
    for batch in batches(4, seed=1):
        synced(own_half(batch, rank))
        single(batch)
    return {"sync_default": synced.sync_enabled(), "synced": state(synced), "single": state(single)}


def dead_codes(rank):
    torch.manual_seed(0)
    module = FastVectorQuantizer(DIM, CODES, decay=0.9, threshold_ema_dead_code=1.0)
    module.set_codebook(torch.randn(CODES, DIM) + 50)  # far from the data: most codes die at once
    initial = state(module)
    data = batches(3, seed=2)
    torch.manual_seed(100 + rank)  # each rank draws its own share of the replacement rows
    _, first_indices, _ = module(own_half(data[0], rank))
    first = state(module)
    second_rows = own_half(data[1], rank) if rank == 0 else torch.empty(0, DIM)  # rank 1 has an empty batch
    _, second_indices, _ = module(second_rows)
    result = {"first": first, "second": state(module), "rows": own_half(data[0], rank), "second_rows": second_rows,
              "first_indices": first_indices, "second_indices": second_indices}
    if HAVE_VQP:  # vqp's VectorQuantize from the same state and seed (its first step only: on an empty
        # batch vqp 1.32 skips the collectives the other rank waits in, and hangs)
        import vector_quantize_pytorch

        theirs = vector_quantize_pytorch.VectorQuantize(DIM, CODES, decay=0.9, threshold_ema_dead_code=1.0)
        theirs.load_state_dict(initial)
        torch.manual_seed(100 + rank)
        theirs(own_half(data[0], rank))
        result["vqp_first"] = state(theirs)
    return result


def tight_clusters(seed):
    """6 tight clusters 20 apart; each rank's half holds rows of all 6."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(WORLD * ROWS_PER_RANK) % 6
    axes = 20 * torch.eye(3, DIM)
    centres = torch.cat([axes, -axes])  # ±20 along three axes
    return centres[labels] + 0.01 * torch.randn(len(labels), DIM, generator=generator), labels


def kmeans_init(rank):
    data, labels = tight_clusters(seed=3)
    result = {"data": data, "labels": labels}
    modules = {"state": lambda: FastVectorQuantizer(DIM, 6, kmeans_init=True, decay=1.0)}
    if HAVE_VQP:
        import vector_quantize_pytorch

        modules["vqp_state"] = lambda: vector_quantize_pytorch.VectorQuantize(DIM, 6, kmeans_init=True, decay=1.0)
    for name, build in modules.items():
        module = build()
        torch.manual_seed(rank)  # different seeds on purpose: each rank draws its share of the seeds
        module(own_half(data, rank))
        result[name] = state(module)
    return result


class AutoEncoder(nn.Module):
    def __init__(self, ema_update):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(6, 8), nn.Linear(8, 6)
        # heads split 8 into 2 vectors of 4 (codebook_dim = dim // heads: no projections)
        self.vq = FastVectorQuantizer(8, CODES, heads=2, codebook_dim=4, separate_codebook_per_head=True,
                                      kmeans_init=True, threshold_ema_dead_code=0.5, ema_update=ema_update,
                                      learnable_codebook=not ema_update)

    def forward(self, x):
        quantized, _, vq_loss = self.vq(self.encoder(x))
        return ((self.decoder(quantized) - x) ** 2).mean() + vq_loss


def ddp_training(rank, ema_update):
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(AutoEncoder(ema_update))  # find_unused_parameters=False
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(10 + rank)
    for _ in range(3):
        loss = ddp(torch.randn(20, 6, generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return state(ddp.module)


def compiled_sync(rank):
    torch.manual_seed(0)
    module = FastVectorQuantizer(DIM, CODES, kmeans_init=True, threshold_ema_dead_code=0.5, decay=0.8)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")  # collectives traced in the graph
    torch.manual_seed(100 + rank)
    for batch in batches(3, seed=4):
        compiled(own_half(batch, rank).requires_grad_())[2].backward()
    return state(module)


def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {"ema": ema_sync(rank), "dead": dead_codes(rank), "kmeans": kmeans_init(rank)}
        results["ddp_ema"] = ddp_training(rank, ema_update=True)
        results["ddp_learnable"] = ddp_training(rank, ema_update=False)
        results["compiled"] = compiled_sync(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(out_dir / "rendezvous"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def assert_same_state(a, b, **tolerance):
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], **(tolerance or dict(rtol=0, atol=0)), msg=name)


def test_two_half_batches_give_the_codebook_of_one_whole_batch(ranks):
    for result in ranks:
        assert result["ema"]["sync_default"]  # on by default under torch.distributed, world size 2
        assert_same_state(result["ema"]["synced"], result["ema"]["single"], **TOLERANCES[torch.float32])
    assert_same_state(ranks[0]["ema"]["synced"], ranks[1]["ema"]["synced"])
    assert not torch.equal(ranks[0]["ema"]["synced"]["_codebook.cluster_size"], torch.ones(1, CODES))


def is_one_of(code, rows) -> bool:
    return bool(((rows - code).abs().sum(1) == 0).any())


def expected_dead(cluster_size, indices, decay=0.9, threshold=1.0):
    """The codes whose EMA cluster size falls under the threshold after a step with the global
    indices (both ranks'), as the EMA step computes it."""
    counts = torch.bincount(indices.reshape(-1), minlength=CODES).float()
    return cluster_size.lerp(counts, 1 - decay) < threshold


def test_dead_codes_are_revived_alike_from_every_ranks_rows_even_with_an_empty_batch(ranks):
    """vqp's rule (superseding "rank 0 decides"): rank 0 splits the draw over the ranks in
    proportion to their row counts, each rank draws its share, every rank gets all of them."""
    for step in ("first", "second"):
        assert_same_state(ranks[0]["dead"][step], ranks[1]["dead"][step])
    first, second = ranks[0]["dead"]["first"], ranks[0]["dead"]["second"]
    rows = [result["dead"]["rows"] for result in ranks]
    # Step 1: the dead codes get rows of both ranks' batches, and cluster_size = the threshold.
    dead = expected_dead(torch.ones(CODES), torch.cat([result["dead"]["first_indices"] for result in ranks]))[None]
    assert int(dead.sum()) >= CODES // 2
    assert bool((first["_codebook.cluster_size"][dead] == 1.0).all())
    from_rank = [sum(is_one_of(code, rows[r]) for code in first["_codebook.embed"][dead]) for r in range(WORLD)]
    assert sum(from_rank) == int(dead.sum()), "a revived code is no row of either rank's batch"
    assert all(count > 0 for count in from_rank), f"rows drawn per rank: {from_rank} (each rank draws its share)"
    # Step 2, rank 1's batch empty: every replacement row is one of rank 0's.
    dead = expected_dead(first["_codebook.cluster_size"][0], ranks[0]["dead"]["second_indices"])[None]
    assert int(dead.sum()) > 0
    assert bool((second["_codebook.cluster_size"][dead] == 1.0).all())
    for code in second["_codebook.embed"][dead]:
        assert is_one_of(code, ranks[0]["dead"]["second_rows"])


def test_dead_code_rows_are_drawn_as_vector_quantize_pytorch_draws_them(ranks):
    if not HAVE_VQP:
        pytest.skip("vector_quantize_pytorch is not installed")
    for result in ranks:
        assert_same_state(result["dead"]["first"], result["dead"]["vqp_first"], **TOLERANCES[torch.float32])


def test_kmeans_init_sums_every_ranks_rows_alike_on_every_rank(ranks):
    assert_same_state(ranks[0]["kmeans"]["state"], ranks[1]["kmeans"]["state"])
    result, data = ranks[0]["kmeans"]["state"], ranks[0]["kmeans"]["data"]
    assert bool(result["_codebook.initted"])
    # vqp's k-means: counts and means summed over the ranks, so each code is the mean of the rows of
    # both ranks nearest to it, and the counts add up to both ranks' rows.
    embed, cluster_size = result["_codebook.embed"][0], result["_codebook.cluster_size"][0]
    nearest = torch.cdist(data, embed).argmin(1)
    counts = torch.bincount(nearest, minlength=6).float()
    assert float(cluster_size.sum()) == WORLD * ROWS_PER_RANK
    torch.testing.assert_close(cluster_size, counts, rtol=0, atol=0)
    used = counts > 0
    means = torch.stack([data[nearest == k].mean(0) for k in range(6) if counts[k] > 0])
    torch.testing.assert_close(embed[used], means, **TOLERANCES["centroids"])


def test_kmeans_init_matches_vector_quantize_pytorch(ranks):
    if not HAVE_VQP:
        pytest.skip("vector_quantize_pytorch is not installed")
    for result in ranks:
        assert_same_state(result["kmeans"]["state"], result["kmeans"]["vqp_state"], **TOLERANCES["centroids"])


@pytest.mark.parametrize("mode", ["ddp_ema", "ddp_learnable"])
def test_ddp_training_keeps_ranks_identical_without_find_unused_parameters(ranks, mode):
    assert_same_state(ranks[0][mode], ranks[1][mode])


def test_compiled_fullgraph_module_syncs_its_codebook(ranks):
    assert_same_state(ranks[0]["compiled"], ranks[1]["compiled"])
    assert bool(ranks[0]["compiled"]["_codebook.initted"])
