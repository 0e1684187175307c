"""Channel layouts of vector-quantize-pytorch: channel-last (..., dim) or channel-first (B, dim, ...)."""
from __future__ import annotations

from torch import Tensor

from ..checks import shape_str


class ChannelLayout:
    """``channel_last=False`` takes (B, dim, N...) (a 2-D (B, dim) input stays as is);
    ``accept_image_fmap`` takes (B, dim, H, W); ``accept_3d_fmap`` takes (B, dim, D, H, W).
    Inside, vectors are channel-last; outputs go back to the input's layout."""

    def __init__(self, channel_last: bool = True, accept_image_fmap: bool = False, accept_3d_fmap: bool = False):
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")
        self.channel_last = bool(channel_last)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.accept_3d_fmap = bool(accept_3d_fmap)
        self.ndim = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else None

    def channel_first(self, ndim: int) -> bool:
        return self.ndim is not None or (not self.channel_last and ndim >= 3)

    def describe(self, dim: int) -> str:
        if self.accept_image_fmap:
            return f"shape (B, dim, H, W) with dim == {dim}"
        if self.accept_3d_fmap:
            return f"shape (B, dim, D, H, W) with dim == {dim}"
        if not self.channel_last:
            return f"shape (B, dim, ...) with dim == {dim}"
        return f"shape (..., dim) with dim == {dim}"

    def to_channel_last(self, x: Tensor, dim: int) -> Tensor:
        """x in this layout -> (..., dim), checking the shape."""
        if x.dim() == 0 or (self.ndim is not None and x.dim() != self.ndim):
            raise ValueError(f"x must have {self.describe(dim)}, got {shape_str(x.shape)}")
        moved = x.movedim(1, -1) if self.channel_first(x.dim()) else x
        if moved.shape[-1] != dim:
            raise ValueError(f"x must have {self.describe(dim)}, got {shape_str(x.shape)}")
        return moved

    def from_channel_last(self, x: Tensor) -> Tensor:
        return x.movedim(-1, 1) if self.channel_first(x.dim()) else x
