"""vector-quantize-pytorch's softmax terms over all K codes, streamed over row chunks.

vqp's logits of a row x against code e are -cdist (minus the NON-squared Euclidean distance,
sqrt(clamp(‖x‖² + ‖e‖² − 2x·e, 1e-8))) or, with cosine similarity, x·e. From them it builds:
the cross-entropy of given or chosen codes (``commitment_use_cross_entropy_loss``, forward's
``indices=``), the codebook-diversity loss (−entropy of the softmax(τ·logits) averaged over the
batch at each sequence position) and the gumbel straight-through gradient (softmax(logits/T)).

Each is a torch.autograd.Function whose forward keeps only per-row log-sum-exps or the
per-position mean probability (positions × K, the statistic itself) and whose backward
recomputes each chunk's logits, flash-attention style. Memory is O(chunk·K + K·d), never N×K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..numerics import compute_dtype

# Logits per chunk (rows × K): 1<<18 float32 values, 1 MiB, which stays in cache (at 20000 x 1024
# x 16 the streamed losses then take no longer than the dense N×K expressions).
CHUNK_LOGITS = 1 << 18
CDIST_EPS = 1e-8  # vqp's cdist clamps the squared distance to at least this
ENTROPY_EPS = 1e-5  # vqp's entropy clamps probabilities to at least this inside the log


def _chunks(num_rows: int, num_codes: int):
    step = max(1, CHUNK_LOGITS // max(num_codes, 1))
    return range(0, num_rows, step), step


def _sqdist(rows: Tensor, codes: Tensor) -> Tensor:
    return ((rows * rows).sum(1, keepdim=True) + (codes * codes).sum(1)[None, :]) - 2 * (rows @ codes.T)


def code_logits(rows: Tensor, codes: Tensor, cosine: bool) -> Tensor:
    """vqp's logits (n, K) of rows (n, d) against codes (K, d): x·e, or -cdist."""
    if cosine:
        return rows @ codes.T
    return -_sqdist(rows, codes).clamp_min(CDIST_EPS).sqrt()


def logits_backward(grad_logits: Tensor, rows: Tensor, codes: Tensor, cosine: bool) -> tuple[Tensor, Tensor]:
    """(grad_rows, grad_codes) of sum(grad_logits · code_logits(rows, codes))."""
    if cosine:
        return grad_logits @ codes, grad_logits.T @ rows
    sq = _sqdist(rows, codes)
    # d(-sqrt(s))/ds = -1/(2·sqrt(s)), and 0 where vqp's clamp holds s at CDIST_EPS
    weight = torch.where(sq >= CDIST_EPS, -grad_logits / (2 * sq.clamp_min(CDIST_EPS).sqrt()), 0.0)
    grad_rows = 2 * (rows * weight.sum(1, keepdim=True) - weight @ codes)
    grad_codes = 2 * (codes * weight.sum(0)[:, None] - weight.T @ rows)
    return grad_rows, grad_codes


class SoftmaxLosses(torch.autograd.Function):
    """(cross_entropy, diversity) of rows (C, M, d) against codebooks (C, K, d), float32.

    cross_entropy: mean over rows with targets (C, M) != -1 of logsumexp(logits) − logits[target]
    (F.cross_entropy with ignore_index=-1); NaN when every target is -1, as in torch.
    diversity: Σ_k p̄ log(max(p̄, 1e-5)) averaged over positions, where p̄ (positions, K) is the
    mean of softmax(temperature·logits) over the rows at one position (row m is at position
    m mod positions, vqp's order). Either is skipped (returned as 0) when its flag is False.
    """

    @staticmethod
    def forward(ctx, rows, codes, targets, cosine: bool, want_ce: bool, want_diversity: bool, positions: int,
                temperature: float):
        num_codebooks, num_rows, _ = rows.shape
        num_codes = codes.shape[1]
        chunks, step = _chunks(num_rows, num_codes)
        ce_sum = rows.new_zeros((), dtype=torch.float64)
        prob_sum = rows.new_zeros((positions, num_codes)) if want_diversity else None
        with torch.no_grad():
            for c in range(num_codebooks):
                for start in chunks:
                    logits = code_logits(rows[c, start:start + step], codes[c], cosine)
                    if want_ce:
                        target = targets[c, start:start + step]
                        picked = logits.gather(1, target.clamp_min(0)[:, None])[:, 0]
                        per_row = torch.logsumexp(logits, 1) - picked
                        ce_sum += per_row[target != -1].sum(dtype=torch.float64)
                    if want_diversity:
                        where = torch.arange(start, start + logits.shape[0], device=rows.device) % positions
                        prob_sum.index_add_(0, where, torch.softmax(logits * temperature, 1))
        ce = ((ce_sum / (targets != -1).sum()).to(rows.dtype) if want_ce else rows.new_zeros(()))
        diversity, mean_prob = rows.new_zeros(()), None
        if want_diversity:
            mean_prob = prob_sum / (num_codebooks * num_rows // positions)
            diversity = (mean_prob * mean_prob.clamp_min(ENTROPY_EPS).log()).sum(-1).mean()
        ctx.save_for_backward(rows, codes, targets, mean_prob)
        ctx.settings = (cosine, want_ce, want_diversity, positions, temperature)
        return ce, diversity

    @staticmethod
    def backward(ctx, grad_ce, grad_diversity):
        rows, codes, targets, mean_prob = ctx.saved_tensors
        cosine, want_ce, want_diversity, positions, temperature = ctx.settings
        num_codebooks, num_rows, _ = rows.shape
        chunks, step = _chunks(num_rows, codes.shape[1])
        grad_rows, grad_codes = torch.zeros_like(rows), torch.zeros_like(codes)
        if want_ce:
            ce_scale = grad_ce / (targets != -1).sum()
        if want_diversity:
            # d/dp̄ of p̄·log(max(p̄, eps)) is log(max(p̄, eps)) + [p̄ >= eps]; then the means' 1/(count·positions)
            per_prob = mean_prob.clamp_min(ENTROPY_EPS).log() + (mean_prob >= ENTROPY_EPS).to(rows.dtype)
            per_prob = per_prob * (grad_diversity / (positions * (num_codebooks * num_rows // positions)))
        for c in range(num_codebooks):
            for start in chunks:
                chunk_rows = rows[c, start:start + step]
                logits = code_logits(chunk_rows, codes[c], cosine)
                grad_logits = torch.zeros_like(logits)
                if want_ce:
                    target = targets[c, start:start + step]
                    probs = torch.softmax(logits, 1)
                    probs.scatter_add_(1, target.clamp_min(0)[:, None], -torch.ones_like(probs[:, :1]))
                    grad_logits += torch.where((target != -1)[:, None], probs, 0.0) * ce_scale
                if want_diversity:
                    where = torch.arange(start, start + logits.shape[0], device=rows.device) % positions
                    probs, upstream = torch.softmax(logits * temperature, 1), per_prob[where]
                    grad_logits += temperature * probs * (upstream - (probs * upstream).sum(1, keepdim=True))
                g_rows, g_codes = logits_backward(grad_logits, chunk_rows, codes[c], cosine)
                grad_rows[c, start:start + step] = g_rows
                grad_codes[c] += g_codes
        return grad_rows, grad_codes, None, None, None, None, None, None


def softmax_losses(rows: Tensor, codes: Tensor, targets: Tensor | None, cosine: bool, *, cross_entropy: bool,
                   diversity: bool, positions: int = 1, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """See SoftmaxLosses; computed in float32 (float64 for float64 rows)."""
    if targets is None:
        targets = torch.full(rows.shape[:2], -1, dtype=torch.int64, device=rows.device)
    dtype = compute_dtype(rows.dtype)
    return SoftmaxLosses.apply(rows.to(dtype), codes.to(dtype), targets.long(), cosine,
                               cross_entropy, diversity, positions, temperature)


class GumbelStraightThrough(torch.autograd.Function):
    """vqp's gumbel straight-through term, one_hot(indices) + π − sg(π) with π = softmax(logits/T),
    times the codebook, minus its value: returns zeros (M, d); the backward sends the upstream g
    through π: grad_logits = π ⊙ (g·e_k − Σ_j π_j g·e_j) / T, then through the logits to rows and
    codes. rows (M, d) and codes (K, d) float32."""

    @staticmethod
    def forward(ctx, rows, codes, temperature: float, cosine: bool):
        ctx.save_for_backward(rows, codes)
        ctx.settings = (temperature, cosine)
        return torch.zeros_like(rows)

    @staticmethod
    def backward(ctx, grad):
        rows, codes = ctx.saved_tensors
        temperature, cosine = ctx.settings
        chunks, step = _chunks(rows.shape[0], codes.shape[0])
        grad_rows, grad_codes = torch.zeros_like(rows), torch.zeros_like(codes)
        for start in chunks:
            chunk_rows = rows[start:start + step]
            probs = torch.softmax(code_logits(chunk_rows, codes, cosine) / temperature, 1)
            along = grad[start:start + step].to(rows.dtype) @ codes.T  # g·e_k
            grad_logits = probs * (along - (probs * along).sum(1, keepdim=True)) / temperature
            g_rows, g_codes = logits_backward(grad_logits, chunk_rows, codes, cosine)
            grad_rows[start:start + step] = g_rows
            grad_codes += g_codes
        return grad_rows, grad_codes, None, None


def dense_softmax_losses(logits: Tensor, targets: Tensor | None, *, cross_entropy: bool, diversity: bool,
                         positions: int = 1, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """SoftmaxLosses' two terms from logits (C, M, K) a codebook_transform_fn already made, in vqp's
    own torch expressions."""
    num_codebooks, _, num_codes = logits.shape
    ce = diversity_loss = logits.new_zeros(())
    if cross_entropy:
        ce = F.cross_entropy(logits.reshape(-1, num_codes), targets.reshape(-1).long(), ignore_index=-1)
    if diversity:
        probs = (logits * temperature).softmax(-1).reshape(num_codebooks, -1, positions, num_codes)
        mean_prob = probs.mean((0, 1))
        diversity_loss = (mean_prob * mean_prob.clamp_min(ENTROPY_EPS).log()).sum(-1).mean()
    return ce, diversity_loss
