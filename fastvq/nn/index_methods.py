"""vector-quantize-pytorch's VectorQuantize methods that work from given indices or rows, as a
mixin of FastVectorQuantizer: get_codes_from_indices, get_output_from_indices, update_indices
(update_ema_indices) and expire_codes_."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_float_tensor, short_repr
from .layout import split_heads


class IndexMethods:
    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """vqp's: codebook rows for indices (B, ...) or (B, ..., heads) with one codebook per head
        (merged to heads·d); channel-first layouts put the code dimension at axis 1."""
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be an int64 or int32 tensor, got {short_repr(indices)}")
        codebook = self.codebook
        if indices.numel() and (int(indices.min()) < -self.codebook_size or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [-codebook_size, codebook_size) = [{-self.codebook_size}, "
                             f"{self.codebook_size}) (negative ones count from the end, as vqp's indexing does), "
                             f"got values in [{int(indices.min())}, {int(indices.max())}]")
        if codebook.dim() == 2:
            codes = codebook[indices]
        else:
            if indices.dim() < 2 or indices.shape[-1] != self.heads:
                raise ValueError(f"indices must have shape (B, ..., heads) with heads == {self.heads}, "
                                 f"got {short_repr(indices)}")
            heads = torch.arange(self.heads, device=indices.device)
            codes = codebook[heads, indices].flatten(-2)
        if (self.layout.fmap_ndim is not None or not self.channel_last) and codes.dim() >= 2:  # vqp's rule
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return self.project_out(self.get_codes_from_indices(indices))

    @torch.no_grad()
    def update_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
        """vqp's update_indices: the codebook step (EMA statistics, EMA update, dead codes) from x
        and given indices (−1 counts as code 0, as in vqp), without a search."""
        check_float_tensor("x", x)
        mask = self._sequence_mask(x, mask, None)
        sequence = self.layout.to_sequence(x, self.dim)
        rows = split_heads(self.project_in(sequence), self.heads, self.separate_codebook_per_head)
        if self.use_cosine_sim:
            rows = F.normalize(rows, dim=-1, eps=1e-6)
        per_row = indices.reshape(sequence.shape[0], sequence.shape[1], self.heads)
        row_indices = split_heads(per_row, self.heads, self.separate_codebook_per_head).squeeze(-1)
        row_indices = row_indices.masked_fill(row_indices == -1, 0).long()
        row_mask = None if mask is None else self._row_mask(mask)
        self._codebook.update_codebook_(select_rows(rows.to(torch.float32), row_mask, self.codebook_dim),
                                        select_rows(row_indices, row_mask, None), ema_update=self._codebook.ema_update)

    update_ema_indices = update_indices

    @torch.no_grad()
    def expire_codes_(self, x: Tensor) -> None:
        """vqp's expire_codes_: replace dead codes by rows of x, given in the codebook's input space
        (B, N, heads·codebook_dim), l2-normalised for cosine similarity before the head split."""
        if self.use_cosine_sim:
            x = F.normalize(x, dim=-1, eps=1e-6)
        rows = split_heads(x.reshape(x.shape[0], -1, x.shape[-1]), self.heads, self.separate_codebook_per_head)
        self._codebook.expire_codes_(rows.to(torch.float32))

    def update_in_place_optimizer(self) -> None:
        """vqp's in-place codebook optimizer is not implemented (the constructor refuses it)."""


def select_rows(tensor: Tensor, row_mask: Tensor | None, dim: int | None) -> Tensor:
    """The rows (C, M[, d]) where row_mask (C, M) is True, as (C, M', [d]) (same M' per codebook)."""
    if row_mask is None:
        return tensor
    picked = tensor[row_mask]
    return picked.view(tensor.shape[0], -1, dim) if dim is not None else picked.view(tensor.shape[0], -1)
