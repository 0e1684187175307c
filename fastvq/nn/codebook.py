"""The codebook state of FastVectorQuantizer and how it learns, as vector-quantize-pytorch 1.32's
``Codebook`` keeps it, so checkpoints load both ways with ``strict=True``.

Buffers (C codebooks of K codes of dimension d): ``initted`` (bool), ``cluster_size`` (C, K),
``embed_avg`` (C, K, d) and ``embed`` (C, K, d; an ``nn.Parameter`` when the codebook learns by
gradient). All float32, whatever the module is cast to.

The EMA step (``track_statistics_`` then ``update_ema``) is vqp's: lerp the per-code counts and
sums by ``1 − decay`` (times ``ema_update_weight``), then embed = embed_avg / ñ with Laplace
smoothing ñ_k = (n_k + eps)/(Σn + K·eps)·Σn. Dead codes (cluster_size < threshold) get batch
vectors drawn with vqp's random calls, so one seed gives the same codes in both libraries.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .distributed import all_reduce_stats
from .ema import embed_from_statistics


class Codebook(nn.Module):
    def __init__(self, dim: int, codebook_size: int, num_codebooks: int, *, kmeans_init: bool, kmeans_iters: int,
                 decay: float, eps: float, threshold_ema_dead_code: float, learnable_codebook: bool,
                 ema_update: bool, manual_ema_update: bool, use_cosine_sim: bool, sync: bool, sync_kmeans: bool,
                 backend: str):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.kmeans_iters = kmeans_iters
        self.decay = decay
        self.eps = eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.reset_cluster_size = threshold_ema_dead_code
        self.learnable_codebook = learnable_codebook
        self.ema_update = ema_update
        self.manual_ema_update = manual_ema_update
        self.use_cosine_sim = use_cosine_sim
        self.sync = sync  # sum the batch statistics over ranks
        self.sync_kmeans = sync_kmeans  # draw k-means seeds and dead-code replacements from every rank
        self.backend = backend
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = torch.empty(num_codebooks, codebook_size, dim)
            nn.init.kaiming_uniform_(embed)  # vqp's uniform_init, same shape, same random draws
            if use_cosine_sim:
                embed = F.normalize(embed, dim=-1, eps=1e-6)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self._kmeans_pending = kmeans_init  # a Python flag: torch.compile guards on it
        self.register_load_state_dict_post_hook(_after_load_state_dict)

    def _apply(self, fn, recurse=True):
        # module.half()/.bfloat16()/.double() must not change the codebook state's dtype
        # (fp16 counts overflow, bf16 sums drift); moves between devices still apply.
        super()._apply(fn, recurse)
        for name in ("cluster_size", "embed_avg", "embed"):
            tensor = getattr(self, name)
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.float()
                else:
                    setattr(self, name, tensor.float())
        return self

    @property
    def has_dead_code_replacement(self) -> bool:
        return self.threshold_ema_dead_code > 0

    # ---- k-means init ----------------------------------------------------------------------
    def init_embed_(self, rows: Tensor) -> None:
        """k-means init from the first training batch, rows (C, M, d) (masked rows removed)."""
        if not self._kmeans_pending:
            return
        ops.kmeans_init_(self.embed.data, self.cluster_size, self.embed_avg, self.initted, rows,
                         self.kmeans_iters, self.use_cosine_sim, self.eps, self.sync_kmeans, self.backend)
        count_write(self.embed)
        self._kmeans_pending = False

    # ---- the EMA step ----------------------------------------------------------------------
    @torch.no_grad()
    def track_statistics_(self, counts: Tensor, sums: Tensor, ema_update_weight: Tensor | Callable | None,
                          accum_ema_update: bool) -> None:
        """Lerp cluster_size and embed_avg towards this batch's counts (C, K) and sums (C, K, d)."""
        if self.sync:
            counts, sums = all_reduce_stats(counts, sums)
        if callable(ema_update_weight):
            ema_update_weight = ema_update_weight(sums, counts)
        if accum_ema_update:  # vqp accumulates the batch statistics in the buffers' .grad
            _accumulate_grad_(self.cluster_size, counts)
            _accumulate_grad_(self.embed_avg, sums)
            return
        _ema_inplace_(self.cluster_size, counts, self.decay, ema_update_weight)
        _ema_inplace_(self.embed_avg, sums, self.decay, ema_update_weight)

    @torch.no_grad()
    def update_ema(self) -> None:
        """embed = embed_avg / the Laplace-smoothed cluster sizes (l2-normalised for cosine).

        A code whose smoothed count is 0 (possible only when every count is 0) keeps its value
        instead of vqp's 0/0."""
        embed = self.embed.data
        if torch.compiler.is_compiling():  # eager writes in place, one (C, K, d) pass fewer; keep dynamo on copy_
            embed.copy_(embed_from_statistics(self.embed_avg, self.cluster_size, self.eps, self.use_cosine_sim, embed))
        else:
            embed_from_statistics(self.embed_avg, self.cluster_size, self.eps, self.use_cosine_sim, embed, out=embed)
        count_write(self.embed)

    @torch.no_grad()
    def update_codebook_(self, rows: Tensor, indices: Tensor, *, ema_update: bool,
                         ema_update_weight: Tensor | Callable | None = None, accum_ema_update: bool = False) -> Tensor:
        """vqp's update_codebook: statistics, then the EMA codebook step, then dead codes.
        rows (C, M, d) float32 (masked rows removed), indices (C, M). Returns the counts (C, K)."""
        counts, sums = self.batch_statistics(rows, indices)
        if not ema_update and not self.has_dead_code_replacement:
            return counts
        self.track_statistics_(counts, sums, ema_update_weight, accum_ema_update)
        if accum_ema_update:
            return counts
        if ema_update and not self.manual_ema_update:
            self.update_ema()
        self.expire_codes_(rows)
        return counts

    def batch_statistics(self, rows: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Per-code counts (C, K) and sums (C, K, d) of rows (C, M, d), in one ema_stats call."""
        num_codebooks, num_rows, dim = rows.shape
        offsets = torch.arange(num_codebooks, device=indices.device).unsqueeze(1) * self.codebook_size
        counts, sums = ops.ema_stats(rows.reshape(-1, dim), (indices + offsets).reshape(-1),
                                     num_codebooks * self.codebook_size, self.backend)
        return counts.view(num_codebooks, self.codebook_size), sums.view(num_codebooks, self.codebook_size, dim)

    # ---- dead codes ------------------------------------------------------------------------
    @torch.no_grad()
    def expire_codes_(self, rows: Tensor) -> None:
        """Codes with cluster_size < threshold_ema_dead_code get rows of this batch (C, M, d)."""
        if not self.has_dead_code_replacement or not self.training:
            return
        ops.expire_codes_(self.embed.data, self.cluster_size, self.embed_avg, rows,
                          float(self.threshold_ema_dead_code), float(self.reset_cluster_size),
                          self.use_cosine_sim, self.sync_kmeans)
        count_write(self.embed)


def count_write(tensor: Tensor) -> None:
    """Bump the version counter after a write through ``.data``, which leaves it alone in eager mode: the cpu
    backend reuses a packed codebook while its version stays the same (fastvq.backends.cpu.cache_key).
    Compiled graphs write mutated buffers back with copy_, which counts already."""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(tensor)


def _accumulate_grad_(buffer: Tensor, value: Tensor) -> None:
    if buffer.grad is not None:
        buffer.grad.add_(value)
    else:
        buffer.grad = value.clone().detach()


def _ema_inplace_(old: Tensor, new: Tensor, decay: float, weight: Tensor | float | None) -> None:
    """vqp's ema_inplace: old ← lerp(old, new (+ accumulated old.grad), (1 − decay)·weight)."""
    if old.grad is not None:
        new = new + old.grad
        old.grad = None
    if weight is None:
        weight = 1.0
    if isinstance(weight, Tensor):
        if weight.dim() == 1:
            weight = weight.unsqueeze(0)
        if weight.dim() != 2 or tuple(weight.shape) != tuple(old.shape[:2]):
            raise ValueError(f"ema_update_weight must have shape (num_codebooks, codebook_size) == "
                             f"{tuple(old.shape[:2])} or (codebook_size,), got {tuple(weight.shape)}")
        weight = weight.reshape(*weight.shape, *([1] * (old.dim() - 2))).to(old)
    old.lerp_(new.to(old), (1.0 - decay) * weight)


def _after_load_state_dict(module: Codebook, incompatible_keys) -> None:
    # A loaded `initted` decides whether the first forward still runs k-means.
    module._kmeans_pending = not bool(module.initted)
