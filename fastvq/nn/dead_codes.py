"""Dead-code revival: codes whose EMA cluster size fell below a threshold get batch vectors.

Written without data-dependent Python branches or shapes (a where over all K codes,
K candidate rows drawn every call), so it traces under torch.compile(fullgraph=True)
and every rank runs the same collective (one broadcast of the candidates from rank 0)
whatever the data.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import distributed


@torch.no_grad()
def revive_dead_codes_(
    embed: Tensor,
    cluster_size: Tensor,
    embed_avg: Optional[Tensor],
    rows: Tensor,
    threshold: float,
    sync: bool,
) -> Tensor:
    """Replace dead codes in place; returns the (C, K) bool mask of the codes replaced.

    embed (C, K, d) or (K, d); cluster_size (C, K)/(K,); embed_avg like embed or None;
    rows (M, C, d), the current batch's vectors for each codebook. A code is dead when
    cluster_size < threshold. It becomes a batch row (distinct rows while M >= K), its
    cluster_size is reset to ``threshold`` and its embed_avg to row · threshold, so the
    next EMA step (embed = embed_avg / smoothed cluster_size) keeps the new code.
    With ``sync``, rank 0's candidate rows are broadcast, so every rank revives alike.
    """
    num_rows, num_codebooks, dim = rows.shape
    num_codes = cluster_size.shape[-1]
    if num_rows == 0 and not sync:
        return torch.zeros((num_codebooks, num_codes), dtype=torch.bool, device=embed.device)
    codes = embed.view(num_codebooks, num_codes, dim)
    if num_rows > 0:
        order = torch.randperm(num_rows, device=rows.device)
        picked = order[torch.arange(num_codes, device=rows.device) % num_rows]
        candidates = rows[picked].transpose(0, 1).to(embed.dtype)  # (C, K, d)
    else:  # an empty batch on this rank: rank 0's rows (if any) arrive by broadcast
        candidates = codes.clone()
    if sync:
        candidates = distributed.broadcast_(candidates.contiguous())
    dead = cluster_size.view(num_codebooks, num_codes) < threshold
    dead_rows = dead.unsqueeze(-1)
    embed.copy_(torch.where(dead_rows, candidates, codes).view(embed.shape))
    cluster_size.copy_(torch.where(dead, threshold, cluster_size.view(dead.shape)).view(cluster_size.shape))
    if embed_avg is not None:
        averages = embed_avg.view(codes.shape)
        embed_avg.copy_(torch.where(dead_rows, candidates * threshold, averages).view(embed_avg.shape))
    return dead
