"""torch.distributed helpers for codebook synchronisation.

Every rank must call these in the same order with the same shapes: which
collectives run depends only on the module's configuration and on shapes, never
on tensor values, so no rank can skip a collective that another rank waits in.
They use functional collectives, which torch.compile(fullgraph=True) can trace.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s value, in place."""
    if is_distributed():
        tensor.copy_(funcol.broadcast(tensor, src, dist.group.WORLD))
    return tensor


def all_reduce_stats(counts: Tensor, sums: Tensor) -> tuple[Tensor, Tensor]:
    """Sum per-code counts (..., K) and sums (..., K, d) over all ranks in one collective."""
    if not is_distributed():
        return counts, sums
    packed = torch.cat([counts.unsqueeze(-1), sums], dim=-1)
    packed = funcol.all_reduce(packed, "sum", dist.group.WORLD)
    return packed[..., 0], packed[..., 1:]


# ---- vector-quantize-pytorch's sampling of rows (k-means init, dead codes) ------------------------
# These run eagerly inside custom ops (torch.compile never traces them), with plain collectives.

def sample_vectors(samples: Tensor, num: int) -> Tensor:
    """num rows of samples (M, d): distinct (randperm) when M >= num, else with replacement (randint)."""
    num_samples = samples.shape[0]
    if num_samples >= num:
        picked = torch.randperm(num_samples, device=samples.device)[:num]
    else:
        picked = torch.randint(0, num_samples, (num,), device=samples.device)
    return samples[picked]


def sample_vectors_distributed(local_samples: Tensor, num: int) -> Tensor:
    """num rows drawn from every rank's samples (M_r, d): rank 0 splits num over the ranks in
    proportion to their row counts (a multinomial draw), each rank draws its share, and every
    rank receives all of them. vqp's ``sample_vectors_distributed``, with the same random calls."""
    rank, world = dist.get_rank(), dist.get_world_size()
    size = torch.tensor(local_samples.shape[0], dtype=torch.long, device=local_samples.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    all_sizes = torch.stack(sizes)
    if rank == 0:
        per_rank = _sample_multinomial(num, all_sizes / all_sizes.sum())
    else:
        per_rank = torch.empty_like(all_sizes)
    dist.broadcast(per_rank, src=0)
    per_rank = per_rank.tolist()
    local = sample_vectors(local_samples, per_rank[rank])
    gathered = []
    for source, count in enumerate(per_rank):
        part = local if source == rank else local.new_empty((count, *local.shape[1:]))
        dist.broadcast(part, src=source)
        gathered.append(part)
    return torch.cat(gathered, dim=0)


def _sample_multinomial(total_count: int, probs: Tensor) -> Tensor:
    device = probs.device
    probs = probs.cpu()
    remaining, remainder = probs.new_full((), total_count), probs.new_ones(())
    sample = torch.empty_like(probs, dtype=torch.long)
    for i, prob in enumerate(probs):
        drawn = torch.binomial(remaining, prob / remainder) if i < len(probs) - 1 else remaining
        sample[i] = drawn
        remaining -= drawn
        remainder -= prob
    return sample.to(device)


def all_reduce_(tensor: Tensor) -> Tensor:
    """Sum over ranks in place (eager collective; for use inside custom ops)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor
