"""The EMA codebook's closing step, shared by the EMA update and k-means init: the codebook from its
running statistics, embed = embed_avg / ñ with Laplace-smoothed counts ñ (vqp's ``update_ema``).

Production code of the module layer; fastvq.reference keeps its own plain formula as the oracle
the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def laplace_smoothed_counts(cluster_size: Tensor, eps: float) -> Tensor:
    """ñ_k = (n_k + eps) / (Σn + K·eps) · Σn over each codebook's K codes (the last axis), which
    keeps every ñ_k > 0.

    Σn is a cumulative sum in float64: a sequential, order-fixed reduction, so the EMA step is
    bitwise identical for any thread count (torch's sum splits large K across threads)."""
    total = cluster_size.double().cumsum(-1)[..., -1:].to(cluster_size.dtype)
    return (cluster_size + eps) / (total + cluster_size.shape[-1] * eps) * total


def embed_from_statistics(embed_avg: Tensor, cluster_size: Tensor, eps: float, spherical: bool,
                          fallback: Tensor, out: Tensor | None = None) -> Tensor:
    """embed_avg / ñ (C, K, d), l2-normalised for cosine similarity. A code whose smoothed count is
    0 (only when all of its codebook's counts are 0) takes ``fallback`` instead of vqp's 0/0.
    Written into ``out`` when given (which may be ``fallback``)."""
    smoothed = laplace_smoothed_counts(cluster_size, eps).unsqueeze(-1)
    if not spherical:
        return torch.where(smoothed > 0, embed_avg / smoothed, fallback, out=out)
    embed = F.normalize(torch.where(smoothed > 0, embed_avg / smoothed, fallback), dim=-1, eps=1e-6)
    return embed if out is None else out.copy_(embed)
