"""Codes chosen other than by the fused nearest-code search: stochastic samples, top-k, or a
``codebook_transform_fn`` (vector-quantize-pytorch's per-row transformed codebooks).

Once a row's code is chosen (its vector gathered, so autograd reaches the codebook or the
transformed codebook), ``quantize_gathered`` gives vqp's straight-through or rotation-trick
value and gradient and its commitment loss, with fastvq's fused ``quantize_backward``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops, reference
from ..checks import short_repr
from ..numerics import NEAREST_CODES_MAX_K, compute_dtype


class QuantizeGathered(torch.autograd.Function):
    """(quantized, loss) of rows x (M, d) and their codes (M, d): quantized is the codes
    (vqp's rotation-trick value where ‖x‖ is tiny) with the straight-through or rotation-trick
    gradient to x; loss = commitment_weight·mean((x − codes)²), whose gradient reaches the codes
    with codebook_weight (vqp's learnable codebook) instead."""

    @staticmethod
    def forward(ctx, x, codes, commitment_weight: float, codebook_weight: float, backend: str,
                rotation_trick: bool):
        dtype = compute_dtype(x.dtype)
        sqdist = ((x.to(dtype) - codes.to(dtype)) ** 2).sum(dtype=torch.float64)
        loss = (sqdist * (commitment_weight / max(x.numel(), 1))).to(dtype)
        quantized = codes.to(x.dtype)
        if rotation_trick and x.shape[0]:
            quantized = ops._rotation_value_of_tiny_rows(x, quantized)
        ctx.save_for_backward(x, codes)
        ctx.settings = (commitment_weight, codebook_weight, backend, rotation_trick)
        return quantized.contiguous(), loss

    @staticmethod
    def backward(ctx, grad_quantized, grad_loss):
        x, codes = ctx.saved_tensors
        commitment_weight, codebook_weight, backend, rotation_trick = ctx.settings
        scale = grad_loss.to(compute_dtype(x.dtype)) * (2.0 / max(x.numel(), 1))
        need_grad_codes = ctx.needs_input_grad[1] and codebook_weight != 0.0
        # Code i of row i: quantize_backward's codebook gradient is then per row.
        rows = torch.arange(x.shape[0], device=x.device)
        grad_x, grad_codes = ops.quantize_backward(
            grad_quantized.contiguous(), x, codes.detach(), rows, scale * commitment_weight, scale * codebook_weight,
            backend, need_grad_codes, rotation_trick)
        return grad_x, (grad_codes if need_grad_codes else None), None, None, None, None


def quantize_gathered(x: Tensor, codes: Tensor, commitment_weight: float, codebook_weight: float, backend: str,
                      rotation_trick: bool) -> tuple[Tensor, Tensor]:
    return QuantizeGathered.apply(x, codes, commitment_weight, codebook_weight, backend, rotation_trick)


def gumbel_noise_like(t: Tensor) -> Tensor:
    """vqp's gumbel_noise: -log(-log(u)), u ~ U[0, 1), logs clamped at 1e-20."""
    noise = torch.zeros_like(t).uniform_(0, 1)
    return -noise.clamp_min(1e-20).log().neg().clamp_min(1e-20).log()


def transformed_codebook_choice(rows: Tensor, codebook: Tensor, transform_fn, batch: int, cosine: bool,
                                stochastic: bool, temperature: float, straight_through: bool,
                                topk: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """vqp's codebook_transform_fn path: transform_fn(codebook (C, K, d)) -> (C, b, n, K, d), one
    transformed codebook per row of rows (C, b·n, d). Returns (indices (C, M[, topk]), codes
    (C, M[, topk], d) gathered from the transformed codebooks, logits (C, M, K)).

    The transformed codebooks are the caller's C·M·K·d tensor; the logits are K·M, 1/d of it.
    The straight-through term (vqp's one_hot + π − sg(π)) is added to codes when asked.
    """
    num_codebooks, num_rows, dim = rows.shape
    transformed = transform_fn(codebook)
    num_codes = codebook.shape[1]
    if (not isinstance(transformed, Tensor) or transformed.dim() != 5
            or tuple(transformed.shape) != (num_codebooks, batch, num_rows // max(batch, 1), num_codes, dim)):
        raise ValueError(f"codebook_transform_fn must return a tensor of shape (C, b, n, K, d) == "
                         f"({num_codebooks}, {batch}, {num_rows // max(batch, 1)}, {num_codes}, {dim}), "
                         f"got {short_repr(transformed)}")
    transformed = transformed.reshape(num_codebooks, num_rows, num_codes, dim).to(rows.dtype)
    if cosine:
        transformed = F.normalize(transformed, dim=-1, eps=1e-6)
        logits = torch.einsum("hnd,hncd->hnc", rows, transformed)
    else:
        logits = -F.pairwise_distance(rows.unsqueeze(-2), transformed)
    sampling = logits / temperature + gumbel_noise_like(logits) if stochastic else logits
    indices = sampling.topk(topk, dim=-1).indices if topk is not None else sampling.argmax(-1)
    picks = indices if topk is not None else indices.unsqueeze(-1)
    codes = transformed.gather(2, picks.unsqueeze(-1).expand(*picks.shape, dim))
    if straight_through and topk is None:
        one_hot = F.one_hot(indices, num_codes).to(logits.dtype)
        probs = (logits / temperature).softmax(-1)
        codes = torch.einsum("hnc,hncd->hnd", one_hot + probs - probs.detach(), transformed).unsqueeze(2)
    return indices, (codes if topk is not None else codes.squeeze(2)), logits


def indices_to_rows(indices: Tensor, batch: int, length: int, heads: int, separate: bool, num_codes: int) -> Tensor:
    """Given codes (B, N) or (B, N, heads) as vqp's forward(indices=) takes them (any shape with
    B·N·heads entries and B leading) -> targets (C, M) in the rows' order; -1 means none."""
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be an int64 or int32 tensor, got {short_repr(indices)}")
    if indices.numel() != batch * length * heads or (indices.dim() and indices.shape[0] != batch):
        expected = f"({batch}, {length})" if heads == 1 else f"({batch}, {length}, {heads})"
        raise ValueError(f"indices must have shape {expected}, got {short_repr(indices)}")
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= num_codes):
        raise ValueError(f"indices must lie in [-1, codebook_size) = [-1, {num_codes}) (-1 is ignored), "
                         f"got values in [{int(indices.min())}, {int(indices.max())}]")
    per_head = indices.long().reshape(batch, length, heads)
    if separate:
        return per_head.permute(2, 0, 1).reshape(heads, batch * length)
    return per_head.permute(0, 2, 1).reshape(1, batch * heads * length)


def nearest_codes_rows(rows: Tensor, codebook: Tensor, k: int, backend: str) -> Tensor:
    """Top-k nearest codes (C, M, k) of rows (C, M, d) in codebooks (C, K, d), nearest first:
    fastvq.nearest_codes, or for k above its limit the chunked reference (never N×K at once)."""
    picks = []
    for c in range(rows.shape[0]):
        if k <= NEAREST_CODES_MAX_K:
            picks.append(ops.nearest_codes(rows[c], codebook[c], k, backend)[0])
        else:
            picks.append(reference.nearest_codes(rows[c], codebook[c], k)[0])
    return torch.stack(picks)


# Seeds for fastvq.sample_code come from torch's default CPU generator, in [0, SEED_HIGH).
SEED_HIGH = 2**63 - 1


def sample_codes_rows(rows: Tensor, codebook: Tensor, temperature: float, cosine: bool, topk: int | None,
                      backend: str) -> Tensor:
    """vqp's stochastic_sample_codes for rows (C, M, d): a draw from softmax(logits / temperature)
    per row (C, M), by fastvq's fused Gumbel-max op, or with topk the k best perturbed codes (C, M, k),
    nearest first, on the chunked reference (no fused top-k sampler). The noise comes from one
    seed per codebook drawn with torch.randint, so torch.manual_seed makes a run reproducible; it
    is not vqp's noise (vqp draws N·K uniforms), so draws match vqp's in distribution only."""
    seeds = torch.randint(0, SEED_HIGH, (rows.shape[0],), dtype=torch.int64).tolist()
    picks = []
    for c, seed in enumerate(seeds):
        if topk is None:
            picks.append(ops.sample_code(rows[c], codebook[c], temperature, seed, cosine, backend))
        else:
            picks.append(_sample_topk(rows[c], codebook[c], temperature, seed, cosine, topk))
    return torch.stack(picks)


def _sample_topk(rows: Tensor, codebook: Tensor, temperature: float, seed: int, cosine: bool, k: int) -> Tensor:
    num_rows, num_codes = rows.shape[0], codebook.shape[0]
    step = max(1, (1 << 20) // max(num_codes, 1))
    codes = torch.arange(num_codes, device=rows.device)
    picks = torch.empty(num_rows, k, dtype=torch.int64, device=rows.device)
    for start in range(0, num_rows, step):
        chunk = rows[start:start + step]
        noise = reference.sample_noise(seed, torch.arange(start, start + chunk.shape[0], device=rows.device), codes,
                                       temperature)
        score = reference.sample_scores(chunk, codebook, cosine) - noise.to(compute_dtype(rows.dtype))
        picks[start:start + step] = torch.topk(-score, k, dim=1).indices
    return picks
