"""The EMA codebook update of FastVectorQuantizer (k-means in an exponential moving average).

Production code of the module layer; fastvq.reference keeps its own plain formula as the oracle
the tests compare against.
"""
from __future__ import annotations

import torch
from torch import Tensor


def laplace_smoothed_counts(cluster_size: Tensor, eps: float) -> Tensor:
    """ñ_k = (n_k + eps) / (Σn + K·eps) · Σn over each codebook's K codes (the last axis), which
    keeps every ñ_k > 0.

    Σn is a cumulative sum in float64: a sequential, order-fixed reduction, so the EMA step is
    bitwise identical for any thread count (torch's sum splits large K across threads)."""
    total = cluster_size.double().cumsum(-1)[..., -1:].to(cluster_size.dtype)
    return (cluster_size + eps) / (total + cluster_size.shape[-1] * eps) * total


def ema_update(embed: Tensor, cluster_size: Tensor, embed_avg: Tensor, counts: Tensor, sums: Tensor,
               decay: float, eps: float) -> None:
    """One EMA codebook step, in place: lerp the statistics, then embed = embed_avg / ñ.

    A code whose smoothed count is 0 has no statistics left (only possible with decay = 0
    and eps = 0, or an empty batch with decay = 0) and keeps its value instead of 0/0.
    """
    cluster_size.lerp_(counts.to(cluster_size.dtype), 1.0 - decay)
    embed_avg.lerp_(sums.to(embed_avg.dtype), 1.0 - decay)
    smoothed = laplace_smoothed_counts(cluster_size, eps).unsqueeze(1)
    embed.copy_(torch.where(smoothed > 0, embed_avg / smoothed, embed))
