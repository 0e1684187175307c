"""ResidualVQ: vector-quantize-pytorch 1.32's ResidualVQ, each level a FastVectorQuantizer.

Level i quantizes what levels < i left over (SoundStream's Algorithm 1). The constructor, the
forward call, the returns, the state_dict keys and the RNG-driven choices (quantize dropout,
k-means seeds, dead codes) are vqp's; beam search (nn/beam_search.py) expands each beam with
fastvq.nearest_codes (with stochastic_sample_codes in training, the k best Gumbel-perturbed codes)
instead of an N×K one-hot.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_float_tensor, short_repr
from .beam_search import beam_search_forward
from .compat import RESIDUAL_VQ_UNSUPPORTED, check_int, reject_unsupported
from .greedy_levels import can_fuse_levels, fused_greedy_levels
from .quantize_dropout import dropout_level, maybe_sync_seed
from .stats import CodebookStats, codebook_stats
from .vector_quantizer import FastVectorQuantizer


class ResidualVQ(nn.Module):
    """Drop-in for ``vector_quantize_pytorch.ResidualVQ`` (same kwargs, defaults and returns).

    ``ResidualVQ(dim, codebook_size, num_quantizers, **kwargs)`` (also by keyword, as vqp takes
    them); codebook_size may be a tuple with one size per level. Every keyword vqp's ResidualVQ
    does not name goes to each level's FastVectorQuantizer (which refuses what fastvq lacks).

    forward(x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
    freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None, *,
    return_stats=False) returns ``(quantized, indices (..., L), losses (L,))``, then all codes
    (L, ..., codebook_dim) with ``return_all_codes``, then a CodebookStats per level with
    ``return_stats`` (fastvq's addition). Levels dropped by quantize dropout have indices −1 and
    loss 0. As in vqp, every level's straight-through (or rotation-trick) output passes its
    gradient to x, so x receives one upstream gradient per level quantized.
    """

    def __init__(self, dim: int | None = None, codebook_size: int | tuple[int, ...] | None = None,
                 num_quantizers: int | None = None, *, codebook_dim=None, shared_codebook=False, heads=1,
                 quantize_dropout=False, quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1,
                 accept_image_fmap=False, beam_size=None, eval_beam_size=None, beam_score_quantizer_weights=None,
                 quant_grad_frac=0.0, return_zeros_for_masked_padding=True, **vq_kwargs):
        super().__init__()
        owner = type(self).__name__
        reject_unsupported(owner, {k: v for k, v in vq_kwargs.items() if k in RESIDUAL_VQ_UNSUPPORTED},
                           RESIDUAL_VQ_UNSUPPORTED)
        vq_kwargs = {k: v for k, v in vq_kwargs.items() if k not in RESIDUAL_VQ_UNSUPPORTED}
        sizes = _codebook_sizes(dim, codebook_size, num_quantizers)
        _check_residual_arguments(heads, quantize_dropout_cutoff_index, quantize_dropout_multiple_of, beam_size,
                                  eval_beam_size, quant_grad_frac, shared_codebook, sizes)
        self.dim = dim
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        check_int("codebook_dim", self.codebook_dim, 1)
        # vqp's order of construction (projections, then the levels), so one seed gives one state.
        self.has_projections = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if self.has_projections else nn.Identity()
        self.accept_image_fmap = bool(accept_image_fmap)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        vq_kwargs["return_zeros_for_masked_padding"] = self.return_zeros_for_masked_padding
        if shared_codebook:
            vq_kwargs["manual_ema_update"] = True  # one EMA step after all levels (vqp's rule)
        self.num_quantizers = len(sizes)
        self.codebook_sizes = sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.layers = nn.ModuleList(
            FastVectorQuantizer(dim=self.codebook_dim, codebook_size=size, codebook_dim=self.codebook_dim,
                                accept_image_fmap=accept_image_fmap, **vq_kwargs) for size in sizes)
        self.quantize_dropout = bool(quantize_dropout) and self.num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.vq_is_ema_updating = self.layers[0].ema_update
        self.quant_grad_frac = float(quant_grad_frac)
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        weights = [1.0] * self.num_quantizers if beam_score_quantizer_weights is None else beam_score_quantizer_weights
        if len(weights) != self.num_quantizers:
            raise ValueError(f"beam_score_quantizer_weights must have one weight per level ({self.num_quantizers}), "
                             f"got {short_repr(beam_score_quantizer_weights)}")
        self.register_buffer("beam_score_weights", torch.tensor(weights), persistent=False)
        self.shared_codebook = bool(shared_codebook)
        if self.shared_codebook:
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook

    # ---- vqp's properties and methods ------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """(L, K, codebook_dim) when all levels have the same K, else a tuple of (K_i, codebook_dim)."""
        codebooks = tuple(layer._codebook.embed[0] for layer in self.layers)
        return torch.stack(codebooks) if self.uniform_codebook_size else codebooks

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (B, ..., q) -> each level's codes (L, B, ..., codebook_dim), channel-last.

        −1 (a dropped level) gives zeros; q < L levels (coarse codes) are padded with −1, which
        vqp allows only with quantize dropout."""
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be an int64 or int32 tensor, got {short_repr(indices)}")
        levels = indices.shape[-1] if indices.dim() >= 2 else -1
        if indices.dim() < 2 or levels > self.num_quantizers or (levels < self.num_quantizers
                                                                  and not self.quantize_dropout):
            allowed = "at most" if self.quantize_dropout else "exactly"
            raise ValueError(f"indices must have shape (B, ..., q) with {allowed} num_quantizers == "
                             f"{self.num_quantizers} levels (fewer only with quantize_dropout), got {short_repr(indices)}")
        for level, size in enumerate(self.codebook_sizes[:levels]):
            column = indices[..., level]
            if column.numel() and (int(column.min()) < -1 or int(column.max()) >= size):
                raise ValueError(f"indices of level {level} must lie in [-1, {size}) (-1: a dropped level), got "
                                 f"values in [{int(column.min())}, {int(column.max())}]")
        indices = indices.long()
        if levels < self.num_quantizers:
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - levels), -1)
            indices = torch.cat([indices, pad], dim=-1)
        dropped = indices == -1
        indices = indices.masked_fill(dropped, 0)
        if self.uniform_codebook_size:
            codes = self.codebooks[torch.arange(self.num_quantizers, device=indices.device), indices]
        else:
            codes = torch.stack([codebook[indices[..., i]] for i, codebook in enumerate(self.codebooks)], dim=-2)
        codes = codes.masked_fill(dropped.unsqueeze(-1), 0.0)
        return codes.movedim(-2, 0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """indices (B, ..., q) -> project_out(Σ of the levels' codes) (B, ..., dim), channel-last."""
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor, mask: Tensor | None = None, indices=None, return_all_codes: bool = False,
                sample_codebook_temp=None, freeze_codebook: bool = False, beam_size: int | None = None,
                rand_quantize_dropout_fixed_seed: int | None = None, *, return_stats: bool = False):
        check_float_tensor("x", x)
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool or x.dim() != 3
                                 or tuple(mask.shape) != tuple(x.shape[:2])):
            raise ValueError(f"mask must be a bool tensor of shape (B, N) for x of shape (B, N, dim), got "
                             f"mask {short_repr(mask)} and x {short_repr(x)}")
        if indices is not None:
            raise ValueError("ResidualVQ.forward(indices=...) (the cross-entropy loss to given codes) is not "
                             "implemented: vector-quantize-pytorch 1.32's ResidualVQ fails on it too (it unpacks "
                             "VectorQuantize's two returns into three)")
        beam = beam_size if beam_size is not None else self.beam_size if self.training else self.eval_beam_size
        if beam is not None and (isinstance(beam, bool) or not isinstance(beam, int) or beam < 1):
            raise ValueError(f"beam_size must be None or an int >= 1, got {short_repr(beam)}")
        orig_input = x
        x = self.project_in(x)
        drop_level = None
        if self.training and self.quantize_dropout:
            seed = rand_quantize_dropout_fixed_seed
            seed = maybe_sync_seed(x.device) if seed is None else seed
            drop_level = dropout_level(seed, self.quantize_dropout_cutoff_index, self.num_quantizers,
                                       self.quantize_dropout_multiple_of)
        if beam is not None and beam > 1:
            quantized_out, all_indices, all_losses, all_residuals = beam_search_forward(
                self, x, mask, beam, freeze_codebook, drop_level, sample_codebook_temp)
        else:
            quantized_out, all_indices, all_losses, all_residuals = self._greedy(
                x, mask, sample_codebook_temp, freeze_codebook, drop_level)
        if self.training and self.shared_codebook:
            self._shared_codebook_step(all_residuals)
        quantized_out = self.project_out(quantized_out)
        if mask is not None:
            fill = torch.zeros_like(quantized_out) if self.return_zeros_for_masked_padding else orig_input
            quantized_out = torch.where(mask.unsqueeze(-1), quantized_out, fill)
        result = (quantized_out, all_indices, all_losses)
        if return_all_codes:
            result = (*result, self.get_codes_from_indices(all_indices))
        if return_stats:
            result = (*result, self._stats(all_indices))
        return result

    def _greedy(self, x: Tensor, mask, sample_codebook_temp, freeze_codebook, drop_level):
        """One nearest code per level: vqp's loop. Returns quantized (codebook space), indices
        (..., L), losses (L,) and the levels' inputs (a list, for the shared codebook's dead codes)."""
        last = self.num_quantizers - 1 if drop_level is None else drop_level
        if can_fuse_levels(self, x, mask):  # the same step, without keeping every level's residual for backward
            return (*fused_greedy_levels(self, x, freeze_codebook, last), None)
        quantized_out, residual = None, x  # vqp starts from zeros; 0 + q is q
        all_indices, all_losses, all_residuals = [], [], []
        for level, layer in enumerate(self.layers):
            if level > last:
                all_indices.append(None)
                all_losses.append(None)
                continue
            all_residuals.append(residual)
            quantized, embed_indices, loss = layer(residual, mask=mask, sample_codebook_temp=sample_codebook_temp,
                                                   freeze_codebook=freeze_codebook)
            if level < last:  # the last level's residual is never used
                residual = residual - _frac_gradient(quantized, self.quant_grad_frac)
            quantized_out = quantized if quantized_out is None else quantized_out + quantized
            all_indices.append(embed_indices)
            all_losses.append(loss)
        kept = [i for i in all_indices if i is not None]
        loss_dtype = torch.promote_types(torch.float32, next(l for l in all_losses if l is not None).dtype)
        indices = torch.stack([i if i is not None else torch.full_like(kept[0], -1) for i in all_indices], dim=-1)
        zero = torch.zeros((), dtype=loss_dtype, device=x.device)
        losses = torch.stack([l.to(loss_dtype) if l is not None else zero for l in all_losses])
        return quantized_out, indices, losses, all_residuals

    @torch.no_grad()
    def _shared_codebook_step(self, all_residuals) -> None:
        """vqp's end of a step with one codebook for all levels: one EMA update, then dead codes
        replaced from the levels' inputs. vqp folds (B, N, L, d) to (B, N·L, d) and its dead-code
        step then draws from the first batch element's rows only; the same rows are used here."""
        shared = self.layers[0]
        if self.vq_is_ema_updating:
            shared.update_ema()
            shared.update_in_place_optimizer()
        if isinstance(all_residuals, list):
            if shared.layout.channel_first(all_residuals[0].dim()):  # feature maps: rows of codebook_dim
                all_residuals = [shared.layout.to_sequence(r, self.codebook_dim) for r in all_residuals]
            stacked = torch.stack(all_residuals, dim=-2)
        else:
            stacked = all_residuals
        folded = stacked.flatten(-3, -2) if stacked.dim() >= 3 else stacked
        rows = folded.reshape(folded.shape[0], -1, folded.shape[-1])[0]
        shared.expire_codes_(rows.unsqueeze(0))

    def _stats(self, all_indices: Tensor) -> CodebookStats:
        """Per-level usage from the returned indices (−1, masked or dropped, counts nowhere)."""
        counts = []
        for level, size in enumerate(self.codebook_sizes):
            flat = all_indices[..., level].reshape(-1)
            keep = (flat >= 0).to(torch.float32)
            counts.append(torch.zeros(size, device=flat.device).index_add_(0, flat.clamp_min(0), keep))
        stats = [codebook_stats(c) for c in counts]
        return CodebookStats(torch.stack([s.perplexity for s in stats]), torch.stack([s.utilization for s in stats]),
                             torch.stack(counts) if self.uniform_codebook_size else tuple(counts))


def _frac_gradient(t: Tensor, frac: float) -> Tensor:
    """vqp's frac_gradient: the value of t, with ``frac`` of its gradient (none at 0)."""
    if frac <= 0:
        return t.detach()
    return frac * t + (1.0 - frac) * t.detach()


def _codebook_sizes(dim, codebook_size, num_quantizers) -> tuple[int, ...]:
    check_int("dim", dim, 1)
    if isinstance(codebook_size, (tuple, list)):
        sizes = tuple(codebook_size)
        if num_quantizers is not None and num_quantizers != len(sizes):
            raise ValueError(f"codebook_size must have one size per level (num_quantizers == {num_quantizers}), "
                             f"got {len(sizes)} sizes")
    else:
        if num_quantizers is None:
            raise ValueError("num_quantizers must be given when codebook_size is an int")
        if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be a positive int, got {short_repr(num_quantizers)}")
        sizes = (codebook_size,) * num_quantizers
    if not sizes:
        raise ValueError("codebook_size must hold at least one size")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"codebook_size must be a positive int or a tuple of them, got {short_repr(codebook_size)}")
    return sizes


def _check_residual_arguments(heads, cutoff, multiple_of, beam_size, eval_beam_size, quant_grad_frac,
                              shared_codebook, sizes) -> None:
    if heads != 1:
        raise ValueError(f"ResidualVQ takes heads=1 only (vector-quantize-pytorch asserts that residual vq is not "
                         f"compatible with multi-headed codes), got heads={short_repr(heads)}")
    if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff < 0:
        raise ValueError(f"quantize_dropout_cutoff_index must be an int >= 0, got {short_repr(cutoff)}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"quantize_dropout_multiple_of must be an int >= 1, got {short_repr(multiple_of)}")
    for name, value in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {short_repr(value)}")
    if eval_beam_size is not None and beam_size is None:
        raise ValueError("eval_beam_size needs beam_size (vector-quantize-pytorch asserts the same)")
    if isinstance(quant_grad_frac, bool) or not isinstance(quant_grad_frac, (int, float)):
        raise TypeError(f"quant_grad_frac must be a float, got {short_repr(quant_grad_frac)}")
    if shared_codebook and len(set(sizes)) != 1:
        raise ValueError(f"shared_codebook=True needs one codebook size for all levels, got codebook_size={sizes}")
