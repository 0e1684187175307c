"""vector-quantize-pytorch's forward(topk=k), as a mixin of FastVectorQuantizer: each vector's k
nearest codes (fastvq.nearest_codes, nearest first), quantized (B, ..., k, d) and a per-code loss
(B, ..., k) in any mode; the codebook does not change (vqp skips its update with topk)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import short_repr
from .code_choice import quantize_gathered
from .index_methods import select_rows
from .layout import ChannelLayout
from .stats import code_counts


class TopkMethods:
    def _check_topk(self, topk) -> int | None:
        if topk is None:
            return None
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be an int >= 1 (vqp clips it to codebook_size), got {short_repr(topk)}")
        if self.heads != 1:
            raise ValueError(f"topk needs heads == 1 (vector-quantize-pytorch asserts the same), got heads={self.heads}")
        if self.training and self.commitment_use_cross_entropy_loss:
            raise ValueError("topk in training is not compatible with commitment_use_cross_entropy_loss=True "
                             "(vector-quantize-pytorch asserts the same)")
        if self.training and self.straight_through:
            raise ValueError("topk in training is not compatible with straight_through=True: vector-quantize-pytorch "
                             "adds the (N, K) softmax to the (N, k, K) one-hots and fails")
        return min(topk, self.codebook_size)

    def _topk_loss(self, commit: Tensor, indices: Tensor, diversity: Tensor | None, shape: tuple[int, ...]):
        """vqp's top-k loss: per code of each vector, (B, ..., k) in the input's layout, in any mode;
        the breakdown's commitment stays (B, N, k), as vqp leaves it."""
        per_code = commit.view(indices.shape)
        loss = per_code * self.commitment_weight if self.has_commitment_loss else per_code
        loss = loss.reshape(*self.layout.indices_shape(shape), indices.shape[-1])
        total, breakdown = self._loss(None, indices, diversity)
        if not self.training:
            return loss, breakdown._replace(commitment=per_code)
        if not self.has_commitment_loss:
            return total, breakdown
        return total + loss, breakdown._replace(commitment=per_code)

    def _topk_rows(self, rows, row_mask, chosen, gathered, route, learns, want_counts):
        """vqp's top-k step on rows (1, M, d) and their codes (1, M, k, d): the rotation trick or
        straight-through value (in training, to the input repeated k times) and the per-code
        mean-squared commitment loss, unweighted, with gradients to the codes only where they learn."""
        num_rows, k, dim = gathered.shape[1:]
        repeated = rows.unsqueeze(2).expand(-1, -1, k, -1)
        quantized = gathered.to(rows.dtype)
        if route:
            value, _ = quantize_gathered(repeated.reshape(-1, dim), gathered.reshape(-1, dim), 0.0, 0.0, self.backend,
                                         self.rotation_trick)
            quantized = value.view(1, num_rows, k, dim)
        codes = gathered if learns or not self.training else gathered.detach()
        commit = ((codes - repeated.to(codes.dtype)) ** 2).mean(-1)[0]
        if row_mask is not None:
            commit = torch.where(row_mask[0][:, None], commit, 0.0)
        counts = None
        if want_counts:
            counts = torch.stack([code_counts(i, self.codebook_size) for i in select_rows(chosen, row_mask, None)])
        return quantized, chosen, commit, counts


def topk_layout(layout: ChannelLayout, quantized: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(B, N, k, d') -> vqp's top-k layout: the input's, with k after the spatial axes."""
    batch, _, k, width = quantized.shape
    if len(shape) == 2:
        return quantized.reshape(batch, k, width)
    first = layout.channel_first(len(shape))
    quantized = quantized.reshape(batch, *(shape[2:] if first else shape[1:-1]), k, width)
    return quantized.movedim(-1, 1) if first else quantized
