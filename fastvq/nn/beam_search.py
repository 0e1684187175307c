"""ResidualVQ's beam search, as vector-quantize-pytorch 1.32 scores and chooses, without its one-hots.

Level by level each row keeps ``beam_size`` partial reconstructions. vqp expands every beam with
its level's top-k codes (``VectorQuantize(topk=k)``: an N·beam·k×K one-hot), scores each candidate
by ``score − weight·loss`` where loss is the commitment loss of that candidate, keeps the best
``beam_size`` (1 at the last level) and finally updates each level's codebook from the chosen
path (``update_indices``; vqp 1.32 updates level 0 only, reproduced below). Here the k codes and
their squared distances come from ``fastvq.nearest_codes``; the choice uses those distances (vqp's
candidate losses up to the order of a d-term sum), and only the chosen candidates are rebuilt with
a gradient, by vqp's elementwise formulas, so returned values and gradients are vqp's.

In training, ``stochastic_sample_codes`` draws each beam's k candidates as the layer's top-k does
(the k best Gumbel-perturbed codes, one seed per level from torch's generator) and scores them by
their elementwise loss; ``codebook_diversity_loss_weight`` adds the level's diversity loss, one
scalar over all its beams' inputs (vqp's averages over rows at each beam slot), to every candidate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import short_repr
from ..numerics import compute_dtype
from .code_choice import sample_codes_rows
from .orthogonal import codebook_orthogonal_loss
from .softmax_losses import softmax_losses


def beam_search_forward(rvq, x: Tensor, mask: Tensor | None, beam: int, freeze_codebook: bool,
                        drop_level: int | None, sample_codebook_temp: float | None = None):
    """x (..., codebook_dim), channel-last. Returns quantized (..., codebook_dim), indices (..., L),
    losses (L,) and the chosen path's level-0 input (..., 1, codebook_dim)."""
    _check_beam_search(rvq, x, mask)
    prefix, width = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, 1, width)  # (M, beams, d)
    row_mask = None if mask is None else mask.reshape(-1)
    scores = torch.zeros(rows.shape[0], 1, dtype=x.dtype, device=x.device)
    quantized_out = torch.zeros_like(rows)
    history = _History()
    for level, layer in enumerate(rvq.layers):
        if drop_level is not None and level > drop_level:
            history.drop_level()
            continue
        is_last = level == (drop_level if drop_level is not None else len(rvq.layers) - 1)
        temperature = layer.sample_codebook_temp if sample_codebook_temp is None else float(sample_codebook_temp)
        sample = rvq.training and layer.stochastic_sample_codes and temperature > 0
        # Keeping one candidate, each beam's nearest code is its only contender (vqp's top-1 of all
        # beam·k candidates is among them), unless the orthogonal loss counts every candidate's code
        # or the candidates are sampled (the first draw need not be the nearest).
        every_candidate = sample or (layer.has_codebook_orthogonal_loss and layer.orthogonal_reg_active_codes_only)
        expand = 1 if is_last and not every_candidate else beam
        candidates, candidate_loss, terms = _expand(layer, rows, row_mask, expand, rvq.training,
                                                    temperature if sample else None)
        weight = rvq.beam_score_weights[level]
        all_scores = (scores.unsqueeze(-1) + (-candidate_loss * weight)).flatten(-2)
        keep = 1 if is_last else beam
        if all_scores.shape[-1] > keep:
            scores, chosen = all_scores.topk(keep, dim=-1)
        else:
            scores, chosen = all_scores, torch.arange(all_scores.shape[-1], device=x.device).expand_as(all_scores)
        num_codes = candidates.shape[-1]
        parent, codes = chosen // num_codes, candidates.flatten(-2).gather(-1, chosen)
        parent_rows = _take(rows, parent)
        quantized, loss = _rebuild(layer, parent_rows, codes, row_mask, terms, rvq.training, freeze_codebook)
        history.extend(parent, codes if row_mask is None else codes.masked_fill(~row_mask[:, None], -1), loss)
        quantized_out = _take(quantized_out, parent) + quantized
        rows = parent_rows - _frac_gradient(quantized, rvq.quant_grad_frac)
    indices, losses = history.best()
    losses = losses.to(torch.promote_types(losses.dtype, torch.float32))  # vqp gathers them in float32
    if row_mask is not None:
        losses = torch.where(row_mask[:, None], losses, 0.0).sum(0) / row_mask.sum().clamp_min(1e-4)
    else:
        losses = losses.mean(0) if losses.shape[0] else losses.sum(0)  # no rows: 0, as the greedy levels say
    # vqp 1.32 keeps the beam axis of its level inputs, (..., 1, l, d)[..., 0, :] -> (..., 1, d): only
    # level 0 then gets its codebook step, and a shared codebook's dead codes are drawn from level 0's
    # inputs. Reproduced, so that training with beam search learns the same codebooks.
    residuals = x.detach().unsqueeze(-2)  # level 0's input is x for every beam
    indices = indices.reshape(*prefix, indices.shape[-1])
    if rvq.training:
        rvq.layers[0].update_indices(residuals[..., 0, :], indices[..., 0], mask=mask)
    return quantized_out[:, 0].reshape(*prefix, width), indices, losses, residuals


def _check_beam_search(rvq, x: Tensor, mask) -> None:
    layer = rvq.layers[0]
    if rvq.accept_image_fmap or layer.layout.fmap_ndim is not None or not layer.channel_last:
        raise ValueError("beam search needs channel-last inputs (..., dim): vector-quantize-pytorch 1.32's beam "
                         "search fails on image/3d feature maps and channel_last=False")
    if x.dim() < 2:
        raise ValueError(f"beam search needs x of shape (B, ..., dim), got {short_repr(x)}")
    if rvq.training and not layer.has_commitment_loss:
        raise ValueError("beam search in training needs commitment_weight > 0: the candidates are scored by their "
                         "commitment loss (vector-quantize-pytorch 1.32 fails without one)")
    for name in ("commitment_use_cross_entropy_loss", "straight_through"):
        if rvq.training and getattr(layer, name):  # each breaks vqp's top-k step in training only
            raise ValueError(f"beam search in training with {name}=True is not supported: vector-quantize-pytorch "
                             f"1.32's beam search fails on it too")
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask must have shape {tuple(x.shape[:-1])} (x's shape without dim), got {short_repr(mask)}")


def _expand(layer, rows: Tensor, row_mask: Tensor | None, beam: int, training: bool, temperature: float | None):
    """Each beam's k candidate codes (M, beams, k) and their losses (M, beams, k) without a
    gradient, vqp's VectorQuantize(topk=k) values; plus the level's weighted scalar terms
    (diversity, orthogonal), each None or with its gradient. temperature: sample the candidates."""
    from .. import nearest_codes  # fastvq's fused top-k search

    state = layer._codebook
    num_rows, beams, width = rows.shape
    inputs = _transform(layer, rows.detach())
    if state._kmeans_pending:  # the first forward initialises the codebook, in any mode, as in vqp
        kept = inputs if row_mask is None else inputs[row_mask]
        state.init_embed_(kept.reshape(1, -1, width).to(torch.float32))
    k = min(beam, layer.codebook_size)
    codebook = state.embed.detach()[0]
    search = inputs.reshape(-1, width).to(compute_dtype(inputs.dtype))
    loss_dtype = torch.promote_types(rows.dtype, torch.float32)
    if temperature is not None:  # the layer's top-k draw, scored by vqp's elementwise loss
        candidates = sample_codes_rows(search[None], codebook[None].to(search.dtype), temperature, layer.use_cosine_sim,
                                       k, layer.backend)[0]
        codes = codebook.to(search.dtype)[candidates]
        losses = ((codes - search[:, None]) ** 2).mean(-1).to(loss_dtype).view(num_rows, beams, k)
        candidates = candidates.view(num_rows, beams, k)
    else:
        candidates, sqdist = nearest_codes(search, codebook.to(search.dtype), k, backend=layer.backend)
        candidates = candidates.view(num_rows, beams, k)
        # vqp's candidate loss, mean((e − x)²) over d, from the kernel's directly computed ‖x − e‖²: the same
        # value up to the order of the d-term sum (the chosen candidates' losses are recomputed as vqp does).
        losses = sqdist.view(num_rows, beams, k).to(loss_dtype) / width
    diversity = _diversity(layer, rows) if training else None
    orthogonal = _orthogonal(layer, candidates) if training else None
    if row_mask is not None:
        losses = torch.where(row_mask[:, None, None], losses, 0.0)
    if training or layer.has_commitment_loss:
        losses = losses * layer.commitment_weight
    losses = _add_terms(losses, (diversity, orthogonal), detach=True)
    return candidates, losses, (diversity, orthogonal)


def _rebuild(layer, parent_rows: Tensor, codes: Tensor, row_mask: Tensor | None, terms, training: bool,
             frozen: bool):
    """The chosen candidates (M, beams, d) with vqp's gradients: the straight-through or rotated
    code for each, its loss, and vqp's masked values."""
    state = layer._codebook
    live = state.embed if state.learnable_codebook else state.embed.detach()
    inputs = _transform(layer, parent_rows)
    quantized = live[0].to(torch.float32)[codes].to(parent_rows.dtype)
    if training:
        detach = not layer.learnable_codebook or frozen
        commit = quantized.detach() if detach else quantized
        if parent_rows.requires_grad and layer.route_gradients_to_input:
            quantized = _rotate_to(inputs, quantized) if layer.rotation_trick else inputs + (quantized - inputs).detach()
        loss = _commitment(layer, commit, inputs, row_mask, terms, training)
    else:
        loss = _commitment(layer, quantized, inputs, row_mask, (None, None), training)
    if row_mask is not None:
        fill = torch.zeros_like(parent_rows) if layer.return_zeros_for_masked_padding else parent_rows
        quantized = torch.where(row_mask[:, None, None], quantized, fill)
    return quantized, loss


def _commitment(layer, codes: Tensor, inputs: Tensor, row_mask, terms, training: bool) -> Tensor:
    """vqp's per-candidate loss: mean squared error over d (0 on masked rows), times the
    commitment weight (in eval only when the level has a commitment loss), plus the scalar terms."""
    loss = F.mse_loss(codes, inputs.expand_as(codes), reduction="none").mean(-1)
    if row_mask is not None:
        loss = torch.where(row_mask.view(-1, *([1] * (loss.dim() - 1))), loss, 0.0)
    if training or layer.has_commitment_loss:
        loss = loss * layer.commitment_weight
    return _add_terms(loss, terms, detach=False)


def _add_terms(loss: Tensor, terms, detach: bool) -> Tensor:
    """vqp's sum for each candidate: (diversity + commitment) + orthogonal, in that order."""
    diversity, orthogonal = terms
    if diversity is not None:
        loss = (diversity.detach() if detach else diversity) + loss
    if orthogonal is not None:
        loss = loss + (orthogonal.detach() if detach else orthogonal)
    return loss


def _diversity(layer, rows: Tensor) -> Tensor | None:
    """The level's weighted codebook-diversity loss over every beam's input rows (M, beams, d), with
    the gradient to them (and to a learnable codebook): vqp's distances (1, M, beams, K) averaged
    over rows at each beam slot, −entropy per slot, mean over the slots."""
    if not layer.has_codebook_diversity_loss:
        return None
    from .. import ops

    state = layer._codebook
    # a copy: the codebook step after the search rewrites embed in place, and the backward needs this one
    codebook = state.embed.clone() if state.learnable_codebook else ops.snapshot(state.embed.detach())
    num_rows, beams, width = rows.shape
    inputs = _transform(layer, rows).reshape(1, num_rows * beams, width)
    _, diversity = softmax_losses(inputs, codebook, None, layer.use_cosine_sim, cross_entropy=False, diversity=True,
                                  positions=beams, temperature=layer.codebook_diversity_temperature)
    return diversity * layer.codebook_diversity_loss_weight


def _orthogonal(layer, candidates: Tensor) -> Tensor | None:
    """The level's weighted orthogonal loss, drawn as vqp draws it (over all candidates' codes)."""
    if not layer.has_codebook_orthogonal_loss:
        return None
    return codebook_orthogonal_loss(layer, candidates) * layer.orthogonal_reg_weight


def _transform(layer, rows: Tensor) -> Tensor:
    return F.normalize(rows, dim=-1, eps=1e-6) if layer.use_cosine_sim else rows


def _rotate_to(src: Tensor, tgt: Tensor) -> Tensor:
    """vqp's rotate_to (the rotation trick, arXiv 2410.06424 §4.2) with its exact sequence of ops,
    on rows packed to (R, d) as vqp packs them."""
    shape = src.shape
    src, tgt = src.reshape(-1, shape[-1]), tgt.reshape(-1, shape[-1])
    norm_src = src.norm(dim=-1, keepdim=True)
    norm_tgt = tgt.norm(dim=-1, keepdim=True)
    u, q, e = src / norm_src.clamp(min=1e-6), tgt / norm_tgt.clamp(min=1e-6), src.unsqueeze(1)
    w = F.normalize(u + q, p=2, dim=1, eps=1e-6).detach()
    rotated = e - 2 * (e @ w.unsqueeze(2) @ w.unsqueeze(1)) + 2 * (e @ u.detach().unsqueeze(2) @ q.detach().unsqueeze(1))
    rotated = rotated.squeeze(1) * (norm_tgt / norm_src.clamp(min=1e-6)).detach()
    return rotated.reshape(shape)


def _frac_gradient(t: Tensor, frac: float) -> Tensor:
    if frac <= 0:
        return t.detach()
    return frac * t + (1.0 - frac) * t.detach()


def _take(t: Tensor, parent: Tensor) -> Tensor:
    """t (M, beams, ...) at beams parent (M, b') -> (M, b', ...), as whole-row copies."""
    num_rows, beams = t.shape[:2]
    flat = parent + torch.arange(num_rows, device=parent.device).unsqueeze(1) * beams
    return t.reshape(num_rows * beams, *t.shape[2:])[flat.reshape(-1)].view(*parent.shape, *t.shape[2:])


class _History:
    """The chosen path of every beam: indices (M, beams, l) and losses (M, beams, l), reordered by
    each level's choice."""

    def __init__(self):
        self.indices = self.losses = None

    def extend(self, parent: Tensor, codes: Tensor, loss: Tensor) -> None:
        if self.indices is None:
            self.indices, self.losses = codes[..., None], loss[..., None]
            return
        self.indices = torch.cat([_take(self.indices, parent), codes[..., None]], dim=-1)
        self.losses = torch.cat([_take(self.losses, parent), loss[..., None]], dim=-1)

    def drop_level(self) -> None:
        self.indices = torch.cat([self.indices, torch.full_like(self.indices[..., :1], -1)], dim=-1)
        self.losses = torch.cat([self.losses, torch.zeros_like(self.losses[..., :1])], dim=-1)

    def best(self) -> tuple[Tensor, Tensor]:
        return self.indices[:, 0], self.losses[:, 0]
