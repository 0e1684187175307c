"""What fastvq.kmeans needs from a torch.distributed process group, and nothing when it runs alone.

x's rows are split over the ranks in rank order: rank r holds the global rows [offset_r, offset_r + rows_r),
any rows_r >= 0. Every collective here has sizes every rank knows before it starts (the global row count,
k, d, a count all ranks computed alike), so an uneven split or a rank without rows never leaves a rank waiting.
The same code runs alone (``group=None``) with the collectives left out, so one process given every row
makes the same choices as the ranks together.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class Shards:
    """The global row numbering of x over a process group (None: this process holds every row)."""

    def __init__(self, rows: int, d: int, device: torch.device, group=None, *, extra: int = 0):
        """``extra``: one more per-rank count to share (kmeans: rows before non-finite ones were left out)."""
        self.group, self.rows = group, rows
        if group is None:
            self.rank, self.sizes, self.extras = 0, [rows], [extra]
        else:
            self.rank = dist.get_rank(group)
            mine = torch.tensor([rows, d, extra], dtype=torch.int64, device=device)
            table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(table, mine, group=group)
            table = torch.stack(table).tolist()
            if len({row[1] for row in table}) > 1:
                raise ValueError(f"x must have the same number of columns d on every rank, got "
                                 f"{[row[1] for row in table]} (ranks in order)")
            self.sizes, self.extras = [row[0] for row in table], [row[2] for row in table]
        self.offset, self.total = sum(self.sizes[: self.rank]), sum(self.sizes)

    def sum_(self, tensor: Tensor) -> Tensor:
        """The element-wise sum over the ranks, in place."""
        if self.group is not None:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def rows_at(self, x: Tensor, index: Tensor) -> Tensor:
        """The global rows ``index`` (the same on every rank) of the sharded x, on every rank: each row comes
        from the rank that holds it, zeros from the others, so the sum is exact."""
        if self.group is None:
            return x[index]
        local = index - self.offset
        mine = (local >= 0) & (local < self.rows)
        out = x.new_zeros((index.shape[0], x.shape[1]))
        out[mine] = x[local[mine]]
        return self.sum_(out)

    def cat(self, tensor: Tensor) -> Tensor:
        """Every rank's tensor (the same shape on every rank), concatenated in rank order along dim 0."""
        if self.group is None:
            return tensor
        parts = [torch.empty_like(tensor) for _ in self.sizes]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)
