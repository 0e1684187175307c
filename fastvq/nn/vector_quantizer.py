"""FastVectorQuantizer: vector-quantize-pytorch 1.32's VectorQuantize on fastvq's fused ops.

The same constructor call, the same inputs and the same state give the same outputs, losses,
gradients and buffers (to float32 rounding), and the state_dict has vqp's keys, shapes and
dtypes, so checkpoints load both ways with ``strict=True``. What fastvq does not implement
raises a ValueError naming the argument (fastvq/nn/compat.py); nothing trains silently
differently. The search, the sampling, the straight-through or rotation-trick backward and the
EMA statistics run in fused kernels, and the softmax terms over all codes (cross-entropy,
diversity, gumbel straight-through; nn/softmax_losses.py) stream over row chunks: nothing
builds the N×K distance matrix (but codebook_transform_fn's own per-row codebooks).
"""
from __future__ import annotations

import contextlib
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..checks import check_float_tensor, short_repr
from ..dispatch import check_backend_argument
from .code_choice import (
    indices_to_rows,
    nearest_codes_rows,
    quantize_gathered,
    sample_codes_rows,
    transformed_codebook_choice,
)
from .codebook import Codebook
from .compat import check_vector_quantize_arguments, reject_unsupported_forward
from .distributed import is_distributed
from .index_methods import IndexMethods, select_rows
from .layout import ChannelLayout, merge_heads, projections, split_heads
from .orthogonal import codebook_orthogonal_loss
from .softmax_losses import GumbelStraightThrough, dense_softmax_losses, softmax_losses
from .stats import code_counts, codebook_stats
from .topk import TopkMethods, topk_layout

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])


class FastVectorQuantizer(IndexMethods, TopkMethods, nn.Module):
    """Drop-in for ``vector_quantize_pytorch.VectorQuantize`` (same kwargs, defaults and returns).

    forward(x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
    freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
    ema_update_weight=None, accum_ema_update=False, ema_update=None, *, return_stats=False)
    returns ``(quantized, indices, loss)`` (+ a LossBreakdown, + a CodebookStats); with ``indices=``
    vqp's ``(codebook-space quantized, cross-entropy of the given codes)``; with ``topk=k``
    quantized (..., k, d) and a per-code loss (..., k). In eval mode the loss is 0 (but with topk)
    and quantized carries no gradient to x, as in vqp. ``stochastic_sample_codes`` draws from
    softmax(logits / T) with fastvq's own hashed noise (fastvq.reference.sample_noise), not vqp's
    random numbers. ``backend`` (keyword only) picks fastvq's kernels ("auto", "cpu", "triton",
    "cuda", "torch").
    """

    def __init__(self, dim, codebook_size, codebook_dim=None, heads=1, separate_codebook_per_head=False, decay=0.8,
                 eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10, sync_kmeans=True,
                 use_cosine_sim=False, layernorm_after_project_in=False, threshold_ema_dead_code=0,
                 channel_last=True, accept_image_fmap=False, accept_3d_fmap=False, commitment_weight=1.0,
                 commitment_use_cross_entropy_loss=False, orthogonal_reg_weight=0.0,
                 orthogonal_reg_active_codes_only=False, orthogonal_reg_max_codes=None,
                 codebook_diversity_loss_weight=0.0, codebook_diversity_temperature=100.0,
                 stochastic_sample_codes=False, sample_codebook_temp=1.0, straight_through=False,
                 rotation_trick=None, directional_reparam=False, directional_reparam_variance=5e-3,
                 sync_codebook=None, sync_affine_param=False, ema_update=None, vq_bridge=None,
                 manual_ema_update=False, learnable_codebook=None, in_place_codebook_optimizer=None,
                 manual_in_place_optimizer_update=False, affine_param=False, affine_param_batch_decay=0.99,
                 affine_param_codebook_decay=0.9, sync_update_v=0.0, return_zeros_for_masked_padding=True,
                 route_gradients_to_input=True, *, backend: str = "auto"):
        super().__init__()
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        check_vector_quantize_arguments(type(self).__name__, arguments)
        check_backend_argument(backend)
        # vqp's defaults of its None arguments
        ema_update = True if ema_update is None else bool(ema_update)
        learnable_codebook = False if learnable_codebook is None else bool(learnable_codebook)
        rotation_trick = dim > 1 if rotation_trick is None else bool(rotation_trick)
        if straight_through and rotation_trick:
            raise ValueError("straight_through=True needs rotation_trick=False (rotation_trick=None means True when "
                             "dim > 1): vector-quantize-pytorch asserts at most one of them")
        if straight_through and learnable_codebook:
            raise ValueError("straight_through=True is not compatible with learnable_codebook=True "
                             "(vector-quantize-pytorch asserts the same)")

        self.dim = dim
        self.heads = heads
        self.separate_codebook_per_head = bool(separate_codebook_per_head)
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        codebook_input_dim = self.codebook_dim * heads
        self.has_projections = codebook_input_dim != dim
        # Built in vqp's order (project_in, project_out, codebook), so one seed gives one state.
        self.project_in, self.project_out = projections(dim, codebook_input_dim, layernorm_after_project_in)
        self.eps = eps
        self.commitment_weight = float(commitment_weight)
        self.commitment_use_cross_entropy_loss = bool(commitment_use_cross_entropy_loss)
        self.codebook_diversity_loss_weight = float(codebook_diversity_loss_weight)
        self.has_codebook_diversity_loss = codebook_diversity_loss_weight > 0.0
        self.codebook_diversity_temperature = float(codebook_diversity_temperature)
        self.stochastic_sample_codes = bool(stochastic_sample_codes)
        self.sample_codebook_temp = float(sample_codebook_temp)
        self.straight_through = bool(straight_through)
        self.has_commitment_loss = commitment_weight > 0.0
        self.learnable_codebook = learnable_codebook
        self.orthogonal_reg_weight = float(orthogonal_reg_weight)
        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0.0
        self.orthogonal_reg_active_codes_only = bool(orthogonal_reg_active_codes_only)
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.rotation_trick = rotation_trick
        self.route_gradients_to_input = bool(route_gradients_to_input)
        self.use_cosine_sim = bool(use_cosine_sim)
        self.sync_codebook = sync_codebook
        self.backend = backend
        self.num_codebooks = heads if self.separate_codebook_per_head else 1
        self._codebook = Codebook(
            self.codebook_dim, codebook_size, self.num_codebooks, kmeans_init=bool(kmeans_init),
            kmeans_iters=kmeans_iters, decay=float(decay), eps=float(eps),
            threshold_ema_dead_code=threshold_ema_dead_code,
            learnable_codebook=self.has_codebook_orthogonal_loss or learnable_codebook, ema_update=ema_update,
            manual_ema_update=bool(manual_ema_update), use_cosine_sim=self.use_cosine_sim,
            sync=self.sync_enabled(), sync_kmeans=self.sync_enabled() and bool(sync_kmeans), backend=backend)
        self.codebook_size = codebook_size
        self.layout = ChannelLayout(channel_last, accept_image_fmap, accept_3d_fmap)
        self.channel_last = self.layout.channel_last
        self.accept_image_fmap = self.layout.accept_image_fmap
        self.accept_3d_fmap = self.layout.accept_3d_fmap
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.freeze_codebook = bool(freeze_codebook)

    # ---- vqp's properties and methods ------------------------------------------------------
    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> Tensor:
        """(K, d), or (heads, K, d) with one codebook per head."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        with torch.no_grad():
            self._codebook.embed.copy_(codes if self.separate_codebook_per_head else codes.unsqueeze(0))

    @torch.no_grad()
    def set_codebook(self, codebook: Tensor) -> None:
        """fastvq's addition: replace the codebook ((K, d), or (heads, K, d) with one codebook per
        head) and restart its EMA state there (embed_avg = codebook, cluster_size = 1), as a fresh
        module has it; l2-normalised for cosine similarity. It counts as initialised (no k-means)."""
        check_float_tensor("codebook", codebook)
        state = self._codebook
        codes = codebook if self.separate_codebook_per_head else codebook.unsqueeze(0)
        if tuple(codes.shape) != tuple(state.embed.shape):
            expected = tuple(state.embed.shape) if self.separate_codebook_per_head else tuple(state.embed.shape[1:])
            raise ValueError(f"codebook must have shape {expected}, got {short_repr(codebook)}")
        if self.use_cosine_sim:
            codes = F.normalize(codes.to(torch.float32), dim=-1, eps=1e-6)
        state.embed.copy_(codes)
        state.embed_avg.copy_(codes)
        state.cluster_size.fill_(1.0)
        state.initted.fill_(True)
        state._kmeans_pending = False

    def sync_enabled(self) -> bool:
        """Whether codebook statistics are summed over torch.distributed ranks: ``sync_codebook``, or
        when None whether torch.distributed runs with several processes when the module is built (vqp's rule)."""
        if self.sync_codebook is None:
            self.sync_codebook = is_distributed()
        return bool(self.sync_codebook)

    def update_ema(self) -> None:
        """The EMA codebook step from the accumulated statistics (for ``manual_ema_update=True``)."""
        self._codebook.update_ema()

    def forward(self, x: Tensor, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update=False, ema_update=None, *, return_stats=False):
        reject_unsupported_forward(type(self).__name__)
        check_float_tensor("x", x)
        if x.device != self._codebook.embed.device:
            raise ValueError(f"x must be on the codebook's device {self._codebook.embed.device}, got {x.device}")
        if codebook_transform_fn is not None and not callable(codebook_transform_fn):
            raise TypeError(f"codebook_transform_fn must be callable, got {short_repr(codebook_transform_fn)}")
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else float(sample_codebook_temp)
        topk = self._check_topk(topk)
        frozen = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        mask = self._sequence_mask(x, mask, lens)
        sequence = self.layout.to_sequence(x, self.dim)  # (B, N, dim)
        batch, length = sequence.shape[:2]
        targets = None
        if indices is not None:  # vqp then returns its codebook-space quantized and this cross-entropy
            targets = indices_to_rows(indices, batch, length, self.heads, self.separate_codebook_per_head,
                                      self.codebook_size)
        projected = self.project_in(sequence)
        rows = split_heads(projected, self.heads, self.separate_codebook_per_head)
        if self.use_cosine_sim:
            rows = F.normalize(rows, dim=-1, eps=1e-6)
        row_mask = None if mask is None else self._row_mask(mask)
        with _no_autocast(x.device.type):
            quantized, row_indices, commit_loss, counts, codebook, logits = self._quantize_rows(
                rows, row_mask, sequence, frozen, x.requires_grad, ema_update, ema_update_weight,
                accum_ema_update, return_stats, temperature, codebook_transform_fn, topk)
            if targets is not None:
                cross_entropy, _ = self._softmax_terms(rows, codebook, logits, targets, False, length)
                # vqp's codebook layout: (B, N, d) with one head, else (heads, B, N, d) or (1, B·heads, N, d)
                quantized = quantized.reshape(quantized.shape[0], -1, length, quantized.shape[-1])
                return (quantized.squeeze(0) if self.heads == 1 else quantized), cross_entropy
            diversity = None
            if self.training and (self.has_codebook_diversity_loss or
                                  (self.has_commitment_loss and self.commitment_use_cross_entropy_loss)):
                chosen = row_indices if row_mask is None else row_indices.masked_fill(~row_mask, -1)
                cross_entropy, diversity = self._softmax_terms(
                    rows, codebook, logits, chosen if self.commitment_use_cross_entropy_loss else None,
                    self.has_codebook_diversity_loss, length)
                if self.has_commitment_loss and self.commitment_use_cross_entropy_loss:
                    commit_loss = cross_entropy * self.commitment_weight
        if topk is not None:  # (1, M, k, ...) -> (B, N, k, ...); one head
            indices, quantized = row_indices.view(batch, length, topk), quantized.view(batch, length, topk, -1)
            loss, breakdown = self._topk_loss(commit_loss, indices, diversity, tuple(x.shape))
        else:
            indices = merge_heads(row_indices, batch, self.heads, self.separate_codebook_per_head)
            indices = indices.squeeze(-1) if self.heads == 1 else indices
            loss, breakdown = self._loss(commit_loss, indices, diversity)
            quantized = merge_heads(quantized, batch, self.heads, self.separate_codebook_per_head).flatten(-2)
        quantized = self.project_out(quantized)
        if mask is not None:
            fill = torch.zeros_like(sequence) if self.return_zeros_for_masked_padding else sequence
            if topk is not None:
                fill = fill.unsqueeze(2)
            quantized = torch.where(mask.view(*mask.shape, *([1] * (quantized.dim() - 2))), quantized, fill)
            indices = torch.where(mask.view(*mask.shape, *([1] * (indices.dim() - 2))), indices, -1)
        if topk is not None:
            quantized = topk_layout(self.layout, quantized, tuple(x.shape))
        else:
            quantized = self.layout.from_sequence(quantized, tuple(x.shape))
        indices = indices.reshape(*self.layout.indices_shape(tuple(x.shape)), *indices.shape[2:])
        result = (quantized, indices, loss)
        if return_loss_breakdown:
            result = (*result, breakdown)
        if return_stats:
            stats = codebook_stats(counts)
            result = (*result, stats._replace(counts=counts.squeeze(0)) if self.num_codebooks == 1 else stats)
        return result

    # ---- the step --------------------------------------------------------------------------
    def _sequence_mask(self, x: Tensor, mask, lens) -> Tensor | None:
        """The (B, N) bool mask from ``mask`` or ``lens``, checked; None when neither is given."""
        if mask is None and lens is None:
            return None
        if mask is not None and lens is not None:
            raise ValueError("pass mask or lens, not both")
        if self.layout.fmap_ndim is not None or x.dim() != 3:
            raise ValueError(f"mask and lens need x of shape (B, N, dim) (or (B, dim, N) with channel_last=False), "
                             f"got {short_repr(x)}")
        if self.has_projections or (self.heads > 1 and not self.separate_codebook_per_head):
            raise ValueError("mask and lens with projections (codebook_dim · heads != dim) or shared-codebook heads "
                             "are not supported: vector-quantize-pytorch 1.32 fails on them too (its masked "
                             "commitment loss compares the codes with the unprojected input)")
        length = x.shape[1] if self.channel_last else x.shape[2]
        if lens is not None:
            if not isinstance(lens, Tensor) or lens.dim() != 1 or lens.shape[0] != x.shape[0]:
                raise ValueError(f"lens must be a tensor of shape ({x.shape[0]},), got {short_repr(lens)}")
            return torch.arange(length, device=lens.device) < lens[:, None]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], length):
            raise ValueError(f"mask must be a bool tensor of shape ({x.shape[0]}, {length}), got {short_repr(mask)}")
        return mask

    def _row_mask(self, mask: Tensor) -> Tensor:
        """(B, N) -> (C, M), in split_heads' row order."""
        if self.separate_codebook_per_head:
            return mask.reshape(1, -1).expand(self.num_codebooks, -1)
        batch, length = mask.shape
        return mask[:, None, :].expand(batch, self.heads, length).reshape(1, -1)

    def _quantize_rows(self, rows, row_mask, sequence, frozen, input_requires_grad, ema_update, ema_update_weight,
                       accum_ema_update, want_counts, temperature, transform_fn, topk=None):
        """rows (C, M, d) -> quantized (C, M, d), indices (C, M), the weighted mean-squared commitment
        loss (or None), per-code counts (C, K) or None, the codebook the codes were chosen from
        (C, K, d), and the logits (C, M, K) where a codebook_transform_fn made them (else None).
        With topk (C = 1): quantized (1, M, k, d), indices (1, M, k) and vqp's unweighted per-code
        commitment loss (M, k) in any mode; the codebook does not change (vqp's rule)."""
        codebook_state = self._codebook
        num_codebooks, _, dim = rows.shape
        if codebook_state._kmeans_pending:  # on the first forward, in any mode, as in vqp
            codebook_state.init_embed_(select_rows(rows.detach().to(torch.float32), row_mask, dim))
        update = self.training and not frozen and topk is None
        ema_now = codebook_state.ema_update if ema_update is None else bool(ema_update)
        learns = self.learnable_codebook and not frozen
        live = codebook_state.embed if codebook_state.learnable_codebook else codebook_state.embed.detach()
        codebook = live
        if update and (ema_now or codebook_state.has_dead_code_replacement):
            # The update rewrites embed in place after the search, and the backward needs the rows
            # the search used. ops.snapshot is a copy torch.compile must save, never recompute.
            codebook = codebook.clone() if codebook_state.learnable_codebook else ops.snapshot(codebook)
        route = self.training and input_requires_grad and self.route_gradients_to_input
        weight = 0.0
        if (self.training and self.has_commitment_loss and row_mask is None
                and not self.commitment_use_cross_entropy_loss):
            weight = self.commitment_weight
        gumbel = self.training and self.straight_through and temperature > 0
        sample = self.training and self.stochastic_sample_codes and temperature > 0
        chosen = gathered = logits = None
        if transform_fn is not None:
            chosen, gathered, logits = transformed_codebook_choice(
                rows, codebook, transform_fn, sequence.shape[0] * (1 if self.separate_codebook_per_head else self.heads),
                self.use_cosine_sim, sample, temperature, gumbel, topk)
        elif topk is not None or sample:
            if sample:  # one seed per codebook from torch's default generator: torch.manual_seed reproduces it
                chosen = sample_codes_rows(rows.detach(), codebook.detach(), temperature, self.use_cosine_sim,
                                           topk, self.backend)
            else:
                chosen = nearest_codes_rows(rows.detach(), codebook.detach(), topk, self.backend)
            gathered = torch.stack([codebook[c][chosen[c]] for c in range(num_codebooks)])
        if topk is not None:
            return self._topk_rows(rows, row_mask, chosen, gathered, route, learns, want_counts) + (codebook, logits)
        quantized, indices, losses = [], [], []
        for c in range(num_codebooks):
            row = rows[c] if num_codebooks > 1 else rows.squeeze(0)  # a squeeze's backward copies nothing
            if chosen is not None:
                i = chosen[c]
                if self.training:
                    q, loss = quantize_gathered(row, gathered[c], weight, weight if learns else 0.0, self.backend,
                                                self.rotation_trick and route)
                    losses.append(loss)
                codes = gathered[c]
            elif self.training:
                q, i, loss = ops.quantize(row, codebook[c], weight, weight if learns else 0.0, self.backend,
                                          self.rotation_trick and route)
                if learns:  # the op's two terms each have vqp's value; keep both gradients, halve the value
                    loss = loss - 0.5 * loss.detach()
                losses.append(loss)
                codes = None if route else live[c][i]
            else:
                row_in, codebook_in = row.detach(), codebook[c].detach()
                search = ops.nearest_code_eager if ops.op_call_is_unobserved(row_in, codebook_in) else ops.nearest_code
                i, _ = search(row_in, codebook_in, self.backend)
                codes = live[c][i]
            # Without the straight-through path vqp returns the gathered codes (live for a learnable codebook),
            # with the gumbel straight-through gradient where asked.
            if not route:
                q = codes.to(rows.dtype)
                if gumbel and transform_fn is None:
                    q = q + GumbelStraightThrough.apply(row.float(), codebook[c].float(), temperature,
                                                        self.use_cosine_sim).to(rows.dtype)
            quantized.append(q)
            indices.append(i)
        quantized, indices = (torch.stack(t) if num_codebooks > 1 else t[0].unsqueeze(0) for t in (quantized, indices))
        commit = None
        if self.training and self.has_commitment_loss and not self.commitment_use_cross_entropy_loss:
            if row_mask is None:
                commit = torch.stack(losses).mean()
            else:
                codes = gathered[0] if gathered is not None else codebook[0][indices[0]]
                codes = codes if learns else codes.detach()
                sequence_rows = sequence.reshape(-1, sequence.shape[-1])
                keep = row_mask[0]
                commit = self.commitment_weight * F.mse_loss(codes[keep], sequence_rows[keep].to(codes.dtype))
        counts = None
        if update and (ema_now or codebook_state.has_dead_code_replacement):
            counts = codebook_state.update_codebook_(
                select_rows(rows.detach().to(torch.float32), row_mask, dim), select_rows(indices, row_mask, None),
                ema_update=ema_now, ema_update_weight=ema_update_weight, accum_ema_update=accum_ema_update)
        elif want_counts:
            counts = torch.stack([code_counts(i, self.codebook_size) for i in select_rows(indices, row_mask, None)])
        return quantized, indices, commit, counts, codebook, logits

    def _softmax_terms(self, rows, codebook, logits, targets, diversity: bool, length: int):
        """vqp's cross-entropy of targets (C, M) (None: skipped) and codebook-diversity loss over
        the logits of rows against codebook, streamed unless a codebook_transform_fn made them."""
        kwargs = dict(cross_entropy=targets is not None, diversity=diversity, positions=length,
                      temperature=self.codebook_diversity_temperature)
        if logits is not None:
            return dense_softmax_losses(logits, targets, **kwargs)
        return softmax_losses(rows, codebook, targets, self.use_cosine_sim, **kwargs)

    def _loss(self, commit: Tensor | None, indices: Tensor, diversity: Tensor | None) -> tuple[Tensor, LossBreakdown]:
        zero = self.zero
        if not self.training:
            return zero, LossBreakdown(zero, zero, zero, zero)
        loss, commitment, orthogonal = zero, zero, zero
        if diversity is not None:
            loss = loss + diversity * self.codebook_diversity_loss_weight
        if commit is not None:
            loss = loss + commit
            commitment = commit / self.commitment_weight
        if self.has_codebook_orthogonal_loss:
            orthogonal = codebook_orthogonal_loss(self, indices)
            loss = loss + orthogonal * self.orthogonal_reg_weight
        if not loss.requires_grad and not torch.compiler.is_compiling():
            # No term needs a gradient (x without one, a buffer codebook): keep the value, and let backward()
            # accept it as vqp's does. Dynamo cannot return a requires_grad_() tensor, so compiled it stays as is.
            loss = loss.detach().requires_grad_()
        return loss, LossBreakdown(commitment, zero if diversity is None else diversity, orthogonal, zero)


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
