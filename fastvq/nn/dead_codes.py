"""Dead-code replacement, as vector-quantize-pytorch 1.32's ``Codebook.replace`` does it.

The work behind the custom op ``fastvq::expire_codes_`` (fastvq/ops.py): the replacement has
data-dependent branches and shapes, so it is one opaque call for torch.compile. It draws its
rows with vqp's random calls in vqp's order (``randperm``/``randint`` on the rows' device), so
a seed replaces the same codes with the same rows in both libraries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import is_distributed, sample_vectors, sample_vectors_distributed


@torch.no_grad()
def expire_codes(embed: Tensor, cluster_size: Tensor, embed_avg: Tensor, rows: Tensor, threshold: float,
                 reset_cluster_size: float, spherical: bool, sync: bool) -> None:
    """Codes with cluster_size < threshold get rows of this batch, in place.

    embed and embed_avg (C, K, d), cluster_size (C, K), rows (C, M, d) (masked rows removed).
    A replaced code gets a row r: embed = r, cluster_size = reset_cluster_size, embed_avg =
    r·reset_cluster_size. Without sync, when a codebook has more dead codes than rows, a random
    subset of its dead codes (as many as rows) is replaced now and the rest in later steps.
    """
    expired = cluster_size < threshold
    if not bool(expired.any()):
        return
    if spherical:
        rows = F.normalize(rows, dim=-1, eps=1e-6)
    distributed = sync and is_distributed()
    for c in range(rows.shape[0]):
        samples, dead = rows[c], expired[c]
        if samples.numel() == 0 and not distributed:  # every rank must join the collectives
            continue
        num_dead = int(dead.sum())
        if not distributed and num_dead > samples.shape[0]:
            dead_codes = dead.nonzero(as_tuple=True)[0]
            dead_codes = dead_codes[torch.randperm(num_dead, device=samples.device)[:samples.shape[0]]]
            dead = torch.zeros_like(dead)
            dead[dead_codes] = True
            num_dead = samples.shape[0]
        if distributed:
            sampled = sample_vectors_distributed(samples, num_dead)
        else:
            sampled = sample_vectors(samples, num_dead)
        sampled = sampled.to(embed)
        embed[c][dead] = sampled
        cluster_size[c][dead] = reset_cluster_size
        embed_avg[c][dead] = sampled * reset_cluster_size
