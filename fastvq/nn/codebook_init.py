"""k-means initialisation of a FastVectorQuantizer codebook from its first training batch.

The work behind the custom op ``fastvq::kmeans_init_`` (fastvq/ops.py), so that
``torch.compile(fullgraph=True)`` sees one opaque call instead of tracing k-means'
data-dependent loops; the module calls it once (a Python flag, guarded by the
compiler, then stops the calls).

With ``sync=True`` (torch.distributed, world size > 1), rank 0 runs k-means on its
own rows and broadcasts the centroids; then every rank assigns its rows to them and
the counts and sums are all-reduced. Every rank runs the same collectives whatever
the data, so none can hang.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..kmeans import fit as kmeans_fit
from ..numerics import compute_dtype
from . import distributed


def kmeans_init_codebook_(
    embed: Tensor,
    cluster_size: Optional[Tensor],
    embed_avg: Optional[Tensor],
    initted: Tensor,
    x: Tensor,
    iters: int,
    spherical: bool,
    sync: bool,
    backend: str,
) -> None:
    """Set each codebook from k-means on x, unless ``initted`` is already True.

    embed (C, K, d) or (K, d) with C = 1; cluster_size (C, K)/(K,) and embed_avg like
    embed, or None (learnable codebooks); initted a bool scalar; x (M, C, d), the rows
    of codebook c being x[:, c] (l2-normalised when ``spherical``).

    Afterwards: embed_avg = the per-code sums of x's rows assigned to the k-means
    centroids, cluster_size = their counts, embed = embed_avg / cluster_size
    (l2-normalised when ``spherical``). A code no row chooses (possible only when
    M < K) keeps its centroid with cluster_size 1, like a fresh codebook.
    """
    if bool(initted):
        return
    num_codebooks, num_rows, dim = x.shape[1], x.shape[0], x.shape[2]
    num_codes = embed.shape[-2]
    if sync:
        rank0_rows = distributed.broadcast_(torch.tensor([num_rows], device=x.device))
        if int(rank0_rows[0]) == 0:
            raise ValueError("kmeans_init: rank 0's first training batch is empty; k-means init needs "
                             "rows on rank 0, which decides the centroids for every rank")
    elif num_rows == 0:
        return
    x = x.to(compute_dtype(x.dtype))
    centroids = x.new_zeros((num_codebooks, num_codes, dim))
    if not sync or distributed.rank() == 0:
        seed = int(torch.randint(2**62, (1,)))  # from torch's global RNG, so torch.manual_seed applies
        generator = torch.Generator(device=x.device).manual_seed(seed)
        for c in range(num_codebooks):
            rows = x[:, c].contiguous()
            centroids[c] = kmeans_fit(rows, num_codes, iters=iters, generator=generator, spherical=spherical,
                                      backend=backend).centroids
    if sync:
        distributed.broadcast_(centroids)
    counts = x.new_zeros((num_codebooks, num_codes), dtype=torch.float32)
    sums = x.new_zeros((num_codebooks, num_codes, dim), dtype=torch.float32)
    for c in range(num_codebooks):
        rows = x[:, c].contiguous()
        assignments, _ = ops.nearest_code(rows, centroids[c], backend)
        counts[c], sums[c] = ops.ema_stats(rows, assignments, num_codes, backend)
    if sync:
        counts, sums = distributed.all_reduce_stats(counts, sums)
    used = counts > 0
    new_cluster_size = torch.where(used, counts, 1.0)
    new_embed_avg = torch.where(used.unsqueeze(-1), sums, centroids.to(sums.dtype))
    new_embed = new_embed_avg / new_cluster_size.unsqueeze(-1)
    if spherical:
        new_embed = F.normalize(new_embed, dim=-1)
    embed.copy_(new_embed.view(embed.shape))
    if cluster_size is not None:
        cluster_size.copy_(new_cluster_size.view(cluster_size.shape))
    if embed_avg is not None:
        embed_avg.copy_(new_embed_avg.view(embed_avg.shape))
    initted.fill_(True)
