"""``fastvq::snapshot``: a copy of a tensor that torch.compile must save, never recompute.

FastVectorQuantizer's EMA step rewrites ``embed`` in place after the search, and the
backward needs the rows the search used. A plain ``embed.clone()`` is correct in eager
mode, but AOTAutograd's partitioners (torch 2.13) may recompute that clone in the
backward from the buffer, after the in-place update, and so return a silently wrong
commitment gradient (pytorch/pytorch PR #197039, "Don't recompute reads of mutated
inputs or mutable buffers"). A custom op is opaque to the partitioner, so its output
is saved instead of recomputed.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("fastvq::snapshot", mutates_args=())
def snapshot(tensor: Tensor) -> Tensor:
    """A new tensor with ``tensor``'s values (no autograd: use it on buffers)."""
    return tensor.clone()


@snapshot.register_fake
def _(tensor):
    return torch.empty_like(tensor)
