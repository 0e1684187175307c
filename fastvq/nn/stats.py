"""Codebook usage statistics from per-code counts: perplexity and utilisation, no N×K one-hot."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class CodebookStats(NamedTuple):
    """Usage of the codebook(s) by one batch.

    perplexity: exp(entropy of the code histogram); 1 when one code takes every vector,
        K when all K codes are used equally. Averaged over codebooks for per-head codebooks.
    utilization: fraction of codes used by at least one vector, averaged likewise.
    counts: float32 (K,) histogram, or (heads, K) with one codebook per head.
    """

    perplexity: Tensor
    utilization: Tensor
    counts: Tensor


def code_counts(indices: Tensor, num_codes: int) -> Tensor:
    """float32 (num_codes,) histogram of int64 indices, with a static output shape (compile-friendly)."""
    flat = indices.reshape(-1)
    counts = torch.zeros(num_codes, dtype=torch.float32, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def codebook_stats(counts: Tensor) -> CodebookStats:
    """Perplexity and utilisation of histograms ``counts`` (..., K), averaged over leading dims.

    An empty batch (all counts 0) has perplexity 1 and utilisation 0.
    """
    counts = counts.to(torch.float32)
    total = counts.sum(-1, keepdim=True)
    probs = counts / total.clamp_min(1.0)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # 0·log 0 = 0
    perplexity = torch.exp(entropy).mean()
    utilization = (counts > 0).to(torch.float32).mean(-1).mean()
    return CodebookStats(perplexity, utilization, counts)
