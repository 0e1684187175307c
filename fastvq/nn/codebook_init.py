"""k-means initialisation of a codebook from its first training batch, as vector-quantize-pytorch
1.32 does it (``Codebook.init_embed_`` and its ``kmeans``), on fastvq's fused ops.

The work behind the custom op ``fastvq::kmeans_init_`` (fastvq/ops.py), so that
``torch.compile(fullgraph=True)`` sees one opaque call instead of k-means' data-dependent
loops; the module calls it once (a Python flag, guarded by the compiler, then stops).

vqp's algorithm: the initial means are rows drawn at random (``randperm``, or ``randint`` when
there are fewer rows than codes), then ``iters`` Lloyd steps in which a code with no rows keeps
its mean; cosine similarity re-normalises the means. Then embed_avg = means · counts,
cluster_size = counts (of the last assignment), and embed = embed_avg / the Laplace-smoothed
counts. With ``sync`` under torch.distributed, rows are drawn from every rank and the counts
and means are summed over ranks, as vqp does.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .distributed import all_reduce_, is_distributed, sample_vectors, sample_vectors_distributed
from .ema import embed_from_statistics


def kmeans_init_codebook_(
    embed: Tensor,
    cluster_size: Tensor,
    embed_avg: Tensor,
    initted: Tensor,
    rows: Tensor,
    iters: int,
    spherical: bool,
    eps: float,
    sync: bool,
    backend: str,
) -> None:
    """Set embed (C, K, d), cluster_size (C, K) and embed_avg from k-means on rows (C, M, d),
    unless ``initted`` is already True; then set ``initted``."""
    if bool(initted):
        return
    num_codes = embed.shape[-2]
    distributed = sync and is_distributed()
    # A row with a NaN or Inf is never a seed and never enters a mean (vqp would draw it as one).
    per_codebook = [codebook_rows[torch.isfinite(codebook_rows).all(dim=1)]
                    for codebook_rows in rows.to(torch.float32).unbind(0)]
    num_rows = min(codebook_rows.shape[0] for codebook_rows in per_codebook)
    if num_rows == 0 and not distributed:
        raise ValueError(f"k-means init needs at least one finite row per codebook in the first batch, got "
                         f"{[codebook_rows.shape[0] for codebook_rows in per_codebook]} finite rows of {rows.shape[1]}")
    if num_rows < num_codes:
        warnings.warn(f"k-means init received {num_rows} vectors for a codebook of {num_codes} - "
                      "duplicates will be sampled", stacklevel=2)
    means, counts = _kmeans(per_codebook, num_codes, iters, spherical, distributed, backend)
    embed_avg.copy_(means * counts.unsqueeze(-1))
    cluster_size.copy_(counts)
    embed.copy_(embed_from_statistics(embed_avg, cluster_size, eps, spherical, fallback=means))
    initted.fill_(True)


def _kmeans(rows: list[Tensor], num_codes: int, iters: int, spherical: bool, distributed: bool,
            backend: str) -> tuple[Tensor, Tensor]:
    """vqp's kmeans on each codebook's rows (M_c, d): (means (C, K, d), counts (C, K) of the last assignment)."""
    sample = sample_vectors_distributed if distributed else sample_vectors
    means = torch.stack([sample(codebook_rows, num_codes) for codebook_rows in rows])
    counts = torch.zeros(means.shape[:2], dtype=torch.float32, device=means.device)
    assignments: list[Tensor | None] = [None] * len(rows)  # the last ones: hints for the next search
    for _ in range(iters):
        sums = torch.zeros_like(means)
        for c in range(len(rows)):
            assignments[c], _ = ops.nearest_code(rows[c], means[c], backend, assignments[c])
            counts[c], sums[c] = ops.ema_stats(rows[c], assignments[c], num_codes, backend)
        if distributed:
            all_reduce_(counts)
        empty = counts == 0
        new_means = sums / counts.masked_fill(empty, 1.0).unsqueeze(-1)
        if distributed:
            all_reduce_(new_means)  # vqp sums the ranks' means, not their sums
        if spherical:
            new_means = F.normalize(new_means, dim=-1, eps=1e-6)
        means = torch.where(empty.unsqueeze(-1), means, new_means)
    return means, counts
