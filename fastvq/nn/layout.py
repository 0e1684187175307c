"""Shapes of vector-quantize-pytorch's VectorQuantize: its input layouts, projections and head split.

Inputs are (B, N, dim) channel-last, (B, dim) for one token, (B, dim, N) with
``channel_last=False``, (B, dim, H, W) with ``accept_image_fmap`` and (B, dim, D, H, W) with
``accept_3d_fmap``; fastvq also takes channel-last (B, ..., dim). Inside, every layout is
(B, N, dim). vqp's projections map dim to heads·codebook_dim and back when they differ. The heads
split the projected (B, N, heads·d) into rows (C, M, d), in vqp's row order: one codebook per head
gives C = heads rows (B, N) each; a shared codebook gives C = 1 and M = B·heads·N rows ordered
(b, h, n).
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from ..checks import shape_str


class ChannelLayout:
    def __init__(self, channel_last: bool = True, accept_image_fmap: bool = False, accept_3d_fmap: bool = False):
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")
        self.channel_last = bool(channel_last)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.accept_3d_fmap = bool(accept_3d_fmap)
        self.fmap_ndim = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else None

    def channel_first(self, ndim: int) -> bool:
        """Whether an input of this rank carries dim at axis 1 (one token (B, dim) never does)."""
        return self.fmap_ndim is not None or (not self.channel_last and ndim >= 3)

    def describe(self, dim: int) -> str:
        if self.accept_image_fmap:
            return f"shape (B, dim, H, W) with dim == {dim}"
        if self.accept_3d_fmap:
            return f"shape (B, dim, D, H, W) with dim == {dim}"
        if not self.channel_last:
            return f"shape (B, dim, N) or (B, dim) with dim == {dim}"
        return f"shape (B, N, dim), (B, ..., dim) or (B, dim) with dim == {dim}"

    def to_sequence(self, x: Tensor, dim: int) -> Tensor:
        """x in this layout -> (B, N, dim) (a view where possible), checking the shape."""
        if x.dim() < 2 or (self.fmap_ndim is not None and x.dim() != self.fmap_ndim):
            raise ValueError(f"x must have {self.describe(dim)}, got {shape_str(x.shape)}")
        moved = x.movedim(1, -1) if self.channel_first(x.dim()) else x
        if moved.shape[-1] != dim:
            raise ValueError(f"x must have {self.describe(dim)}, got {shape_str(x.shape)}")
        return moved.reshape(moved.shape[0], math.prod(moved.shape[1:-1]), dim)

    def from_sequence(self, x: Tensor, like_shape: tuple[int, ...]) -> Tensor:
        """(B, N, d') -> the input's layout (like_shape, with d' at the channel axis)."""
        first = self.channel_first(len(like_shape))
        spatial = like_shape[2:] if first else like_shape[1:-1]
        if len(like_shape) == 2:  # one token: (B, d')
            return x.reshape(x.shape[0], x.shape[-1])
        x = x.reshape(x.shape[0], *spatial, x.shape[-1])
        return x.movedim(-1, 1) if first else x

    def indices_shape(self, like_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The leading shape of indices for an input of like_shape: (B, ...) without dim."""
        if len(like_shape) == 2:
            return (like_shape[0],)
        first = self.channel_first(len(like_shape))
        return (like_shape[0], *(like_shape[2:] if first else like_shape[1:-1]))


def split_heads(x: Tensor, heads: int, separate: bool) -> Tensor:
    """(B, N, heads·d) -> rows (C, M, d) in vqp's order."""
    batch, length, width = x.shape
    dim = width // heads
    per_head = x.reshape(batch, length, heads, dim)
    if separate:  # 'b n (h d) -> h (b n) d'
        return per_head.permute(2, 0, 1, 3).reshape(heads, batch * length, dim)
    return per_head.permute(0, 2, 1, 3).reshape(1, batch * heads * length, dim)  # '1 (b h n) d'


def merge_heads(rows: Tensor, batch: int, heads: int, separate: bool) -> Tensor:
    """Rows (C, M, ...) -> (B, N, heads, ...): the inverse order of split_heads."""
    tail = rows.shape[2:]
    length = rows.shape[1] // max(batch * (1 if separate else heads), 1)
    if separate:
        return rows.reshape(heads, batch, length, *tail).movedim(0, 2)
    return rows.reshape(batch, heads, length, *tail).movedim(1, 2)


def projections(dim: int, codebook_input_dim: int, layernorm: bool) -> tuple[nn.Module, nn.Module]:
    """vqp's project_in (a Linear, then a LayerNorm when asked) and project_out; identities when the
    codebook input width equals dim."""
    if codebook_input_dim == dim:
        return nn.Identity(), nn.Identity()
    project_in = nn.Linear(dim, codebook_input_dim)
    if layernorm:
        project_in = nn.Sequential(project_in, nn.LayerNorm(codebook_input_dim))
    return project_in, nn.Linear(codebook_input_dim, dim)
