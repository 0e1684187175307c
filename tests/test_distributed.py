"""Codebook sync over torch.distributed: 2 gloo processes on CPU, spawned once for the whole file.

The workers run every scenario and save what they saw; the tests below judge it.
A rendezvous file and a 60 s collective timeout mean a hang fails instead of blocking.
"""
from __future__ import annotations

import datetime
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
    torch.manual_seed(100 + rank)  # each rank draws different candidates; rank 0's must win
    data = batches(3, seed=2)
    module(own_half(data[0], rank))
    first = state(module)
    module(own_half(data[1], rank) if rank == 0 else torch.empty(0, DIM))  # rank 1 has an empty batch
    return {"first": first, "second": state(module), "rank0_rows": own_half(data[0], 0)}


def tight_clusters(seed):
    """6 tight clusters 20 apart; each rank's half holds rows of all 6."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(WORLD * ROWS_PER_RANK) % 6
    axes = 20 * torch.eye(3, DIM)
    centres = torch.cat([axes, -axes])  # ±20 along three axes
    return centres[labels] + 0.01 * torch.randn(len(labels), DIM, generator=generator), labels


def kmeans_init(rank):
    torch.manual_seed(rank)  # different seeds on purpose: rank 0 decides
    module = FastVectorQuantizer(DIM, 6, kmeans_init=True, decay=1.0)
    data, labels = tight_clusters(seed=3)
    module(own_half(data, rank))
    return {"state": state(module), "data": data, "labels": labels}


class AutoEncoder(nn.Module):
    def __init__(self, ema_update):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(6, 8), nn.Linear(8, 6)
        self.vq = FastVectorQuantizer(8, CODES, heads=2, separate_codebook_per_head=True, kmeans_init=True,
                                      threshold_ema_dead_code=0.5, ema_update=ema_update)

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
    assert not torch.equal(ranks[0]["ema"]["synced"]["cluster_size"], torch.ones(CODES))


def test_dead_codes_are_revived_alike_from_rank_0_even_with_an_empty_batch(ranks):
    for step in ("first", "second"):
        assert_same_state(ranks[0]["dead"][step], ranks[1]["dead"][step])
    first, rows = ranks[0]["dead"]["first"], ranks[0]["dead"]["rank0_rows"]
    revived = first["cluster_size"] == 1.0
    assert int(revived.sum()) >= CODES // 2
    for code in first["embed"][revived]:  # every revived code is one of rank 0's rows
        assert bool(((rows - code).abs().sum(1) == 0).any())


def test_kmeans_init_is_decided_on_rank_0_and_uses_every_ranks_rows(ranks):
    assert_same_state(ranks[0]["kmeans"]["state"], ranks[1]["kmeans"]["state"])
    result, data, labels = ranks[0]["kmeans"]["state"], ranks[0]["kmeans"]["data"], ranks[0]["kmeans"]["labels"]
    assert bool(result["initted"])
    # Each code is one cluster's mean over both ranks' rows, with that cluster's global count.
    means = torch.stack([data[labels == c].mean(0) for c in range(6)])
    counts = torch.bincount(labels, minlength=6).float()
    order = torch.cdist(result["embed"], means).argmin(1)
    assert sorted(order.tolist()) == list(range(6))
    torch.testing.assert_close(result["embed"], means[order], **TOLERANCES["centroids"])
    torch.testing.assert_close(result["cluster_size"], counts[order], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["ddp_ema", "ddp_learnable"])
def test_ddp_training_keeps_ranks_identical_without_find_unused_parameters(ranks, mode):
    assert_same_state(ranks[0][mode], ranks[1][mode])


def test_compiled_fullgraph_module_syncs_its_codebook(ranks):
    assert_same_state(ranks[0]["compiled"], ranks[1]["compiled"])
    assert bool(ranks[0]["compiled"]["initted"])
