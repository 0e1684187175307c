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
