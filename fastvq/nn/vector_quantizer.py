"""FastVectorQuantizer: a drop-in for vector-quantize-pytorch's VectorQuantize on fastvq's kernels."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..checks import (check_float_tensor, check_fraction, check_non_negative, check_positive_int, check_same_device,
                      shape_str)
from ..dispatch import check_backend_argument
from .compat import (FORWARD_UNSUPPORTED, STRAIGHT_THROUGH_ROTATION_TRICK, VECTOR_QUANTIZE_UNSUPPORTED,
                     reject_unsupported)
from .dead_codes import revive_dead_codes_
from .distributed import all_reduce_stats, is_distributed
from .ema import ema_update
from .layout import ChannelLayout
from .stats import code_counts, codebook_stats


class FastVectorQuantizer(nn.Module):
    """Vector quantizer with an EMA (default) or gradient-learned codebook.

    forward(x) takes x of shape (..., dim), channel-last, and returns
    ``(quantized, indices, loss)``: quantized has x's shape and dtype and the
    straight-through gradient; indices has shape x.shape[:-1]; loss is a scalar,
    commitment_weight·mean((x − sg(q))²), plus mean((sg(x) − q)²) when the codebook
    is learned by gradient (``ema_update=False``).

    Training with ``ema_update=True`` runs, in this order: search against the
    current codebook, quantize with those rows, the loss, then the EMA update of
    ``cluster_size``, ``embed_avg`` and ``embed`` (Laplace-smoothed), then dead-code
    revival. Eval mode changes no state. Half-precision inputs are computed in
    float32 and returned in their own dtype; the codebook state is float32.

    Training features (vector-quantize-pytorch's names):
    - ``kmeans_init``/``kmeans_iters``: the first training batch sets the codebook by k-means.
    - ``threshold_ema_dead_code``: codes with cluster_size below it get batch vectors.
    - ``use_cosine_sim``: l2-normalised inputs and codes (codes unit-norm after every step).
    - ``heads``/``separate_codebook_per_head``: x's dim is split into ``heads`` vectors
      of dim/heads, quantized with one shared codebook (K, dim/heads) or one per head
      (heads, K, dim/heads); indices gain a trailing heads axis.
    - ``channel_last=False`` ((B, C, N) in and out), ``accept_image_fmap`` ((B, C, H, W),
      indices (B, H, W)) and ``accept_3d_fmap`` ((B, C, D, H, W)).
    - ``sync_codebook``: all-reduce codebook statistics over torch.distributed ranks;
      None means on when torch.distributed is initialised with world size > 1.
    - ``forward(x, return_stats=True)`` also returns a CodebookStats (perplexity,
      utilization, counts) of this process's batch, computed from per-code counts.
    Other VectorQuantize kwargs are accepted only at their defaults (fastvq/nn/compat.py).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 0.25,
        ema_update: bool = True,
        backend: str = "auto",
        learnable_codebook: bool | None = None,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        threshold_ema_dead_code: float = 0,
        use_cosine_sim: bool = False,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        codebook_dim: int | None = None,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        sync_codebook: bool | None = None,
        freeze_codebook: bool = False,
        rotation_trick: bool | None = None,
        **unsupported,
    ):
        super().__init__()
        _check_arguments(type(self).__name__, unsupported, dim=dim, codebook_size=codebook_size, heads=heads,
                         decay=decay, eps=eps, commitment_weight=commitment_weight,
                         threshold_ema_dead_code=threshold_ema_dead_code, kmeans_iters=kmeans_iters, backend=backend,
                         codebook_dim=codebook_dim, learnable_codebook=learnable_codebook, ema_update=ema_update,
                         rotation_trick=rotation_trick)
        self.dim = dim
        self.codebook_size = codebook_size
        self.decay = float(decay)
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        self.ema_update = bool(ema_update)
        self.learnable_codebook = not self.ema_update
        self.backend = backend
        self.heads = heads
        self.separate_codebook_per_head = bool(separate_codebook_per_head) and heads > 1
        self.num_codebooks = heads if self.separate_codebook_per_head else 1
        self.codebook_dim = dim // heads
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = kmeans_iters
        self.sync_kmeans = bool(sync_kmeans)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.use_cosine_sim = bool(use_cosine_sim)
        self.layout = ChannelLayout(channel_last, accept_image_fmap, accept_3d_fmap)
        self.channel_last = self.layout.channel_last
        self.accept_image_fmap = self.layout.accept_image_fmap
        self.accept_3d_fmap = self.layout.accept_3d_fmap
        self.sync_codebook = sync_codebook
        self.freeze_codebook = bool(freeze_codebook)

        shape = (codebook_size, self.codebook_dim)
        if self.num_codebooks > 1:
            shape = (self.num_codebooks, *shape)
        embed = torch.empty(self.num_codebooks * codebook_size, self.codebook_dim)
        nn.init.kaiming_uniform_(embed)  # the initialisation VectorQuantize uses
        embed = embed.view(shape)
        if self.use_cosine_sim:
            embed = F.normalize(embed, dim=-1)
        if self.ema_update:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_avg", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
        if self.ema_update or self.threshold_ema_dead_code > 0:
            self.register_buffer("cluster_size", torch.ones(shape[:-1]))
        if self.kmeans_init:
            self.register_buffer("initted", torch.tensor(False))
        self._kmeans_pending = self.kmeans_init  # a Python flag: torch.compile guards on it
        self.register_load_state_dict_post_hook(_after_load_state_dict)

    @property
    def codebook(self) -> Tensor:
        return self.embed

    def extra_repr(self) -> str:
        mode = "ema" if self.ema_update else "learnable"
        text = (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook={mode}, decay={self.decay}, "
                f"commitment_weight={self.commitment_weight}, backend={self.backend!r}")
        if self.heads > 1:
            text += f", heads={self.heads}, separate_codebook_per_head={self.separate_codebook_per_head}"
        for name in ("kmeans_init", "use_cosine_sim", "accept_image_fmap", "accept_3d_fmap"):
            if getattr(self, name):
                text += f", {name}=True"
        if self.threshold_ema_dead_code > 0:
            text += f", threshold_ema_dead_code={self.threshold_ema_dead_code}"
        return text

    def sync_enabled(self) -> bool:
        """Whether codebook statistics are all-reduced over torch.distributed ranks."""
        return is_distributed() if self.sync_codebook is None else bool(self.sync_codebook)

    @torch.no_grad()
    def set_codebook(self, codebook: Tensor) -> None:
        """Replace the codebook; in EMA mode also reset cluster_size to 1 and embed_avg to it.

        The shape is embed's: (codebook_size, dim // heads), or (heads, codebook_size,
        dim // heads) with separate codebooks. With use_cosine_sim the rows are
        l2-normalised. A set codebook counts as initialised: k-means init will not replace it.
        """
        check_float_tensor("codebook", codebook)
        if tuple(codebook.shape) != tuple(self.embed.shape):
            raise ValueError(f"codebook must have shape {shape_str(self.embed.shape)}, got {shape_str(codebook.shape)}")
        if self.use_cosine_sim:
            codebook = F.normalize(codebook.to(self.embed.dtype), dim=-1)
        self.embed.copy_(codebook)
        if self.ema_update:
            self.embed_avg.copy_(codebook)
        if hasattr(self, "cluster_size"):
            self.cluster_size.fill_(1.0)
        if self.kmeans_init:
            self.initted.fill_(True)
            self._kmeans_pending = False

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codebook vectors for integer indices: (...) -> (..., dim); with heads > 1,
        (..., heads) -> (..., dim). Channel-first layouts put dim at axis 1, as forward does."""
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            got = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
            raise TypeError(f"indices must be an int64 or int32 tensor, got {got}")
        if self.heads > 1 and (indices.dim() == 0 or indices.shape[-1] != self.heads):
            raise ValueError(f"indices must have shape (..., heads) with heads == {self.heads}, "
                             f"got {shape_str(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, codebook_size) = [0, {self.codebook_size}), "
                             f"got values in [{int(indices.min())}, {int(indices.max())}]")
        codebook = self._search_codebook()
        indices = indices.long()
        if self.num_codebooks > 1:
            codes = codebook[torch.arange(self.heads, device=indices.device), indices]
        else:
            codes = codebook[indices]
        if self.heads > 1:
            codes = codes.flatten(-2)
        return self.layout.from_channel_last(codes)

    def forward(self, x: Tensor, *, return_stats: bool = False, freeze_codebook: bool | None = None,
                **unsupported):
        """(quantized, indices, loss), plus a CodebookStats when ``return_stats``."""
        reject_unsupported(f"{type(self).__name__}.forward", unsupported, FORWARD_UNSUPPORTED)
        check_float_tensor("x", x)
        x_last = self.layout.to_channel_last(x, self.dim)
        check_same_device(x, self.embed)
        frozen = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        with _no_autocast(x.device.type):  # the codebook math stays float32
            quantized, indices, loss, counts = self._quantize(x_last, frozen, return_stats)
        quantized = self.layout.from_channel_last(quantized)
        if self.heads == 1:
            indices = indices.squeeze(-1)
        if not return_stats:
            return quantized, indices, loss
        stats = codebook_stats(counts)
        if self.num_codebooks == 1:
            stats = stats._replace(counts=counts.squeeze(0))
        return quantized, indices, loss, stats

    # ---- the step --------------------------------------------------------------------------
    def _quantize(self, x: Tensor, frozen: bool, want_counts: bool):
        """x (..., dim) -> quantized (..., dim), indices (..., heads), loss, counts (C, K) or None."""
        update = self.training and not frozen
        lead_shape = x.shape[:-1]
        # (M, C, d): row m of codebook c. A shared codebook sees every head's vector as a row.
        rows = x.reshape(-1, self.num_codebooks, self.codebook_dim)
        if self.use_cosine_sim:
            rows = F.normalize(rows.to(torch.float32), dim=-1)
        sync = self.sync_enabled()
        if update and self._kmeans_pending:
            self._run_kmeans_init(rows.detach(), sync)
        if update and self.learnable_codebook and self.threshold_ema_dead_code > 0:
            revive_dead_codes_(self.embed, self.cluster_size, None, rows.detach(), self.threshold_ema_dead_code, sync)
        codebook = self._search_codebook()
        if update and self.ema_update:
            # The EMA step rewrites embed in place; backward needs the rows this forward used.
            # A custom-op copy, as torch.compile may recompute a plain clone after the update.
            codebook = ops.snapshot(codebook)
        codebook_weight = 1.0 if self.learnable_codebook and not frozen else 0.0
        if self.num_codebooks == 1:
            quantized, indices, loss = ops.quantize(
                rows.view(-1, self.codebook_dim), codebook, self.commitment_weight, codebook_weight, self.backend)
            quantized, indices = quantized.view(rows.shape), indices.view(rows.shape[:-1])
        else:
            per_head = rows.transpose(0, 1).contiguous()  # (C, M, d): one contiguous block per codebook
            outputs = [ops.quantize(per_head[c], codebook[c], self.commitment_weight,
                                                 codebook_weight, self.backend) for c in range(self.num_codebooks)]
            quantized = torch.stack([q for q, _, _ in outputs], dim=1)
            indices = torch.stack([i for _, i, _ in outputs], dim=1)
            loss = torch.stack([l for _, _, l in outputs]).mean()
        counts = None
        if update and (self.ema_update or self.threshold_ema_dead_code > 0):
            counts = self._update_codebook(rows.detach(), indices, sync)
        elif want_counts:
            counts = self._counts(indices)
        quantized = quantized.to(x.dtype).reshape(x.shape)
        return quantized, indices.reshape(*lead_shape, self.heads), loss, counts

    @torch.no_grad()
    def _update_codebook(self, rows: Tensor, indices: Tensor, sync: bool) -> Tensor:
        """EMA step (or cluster-size tracking for a learnable codebook), then dead-code revival.
        rows (M, C, d), indices (M, C). Returns this process's counts (C, K)."""
        num_codes = self.codebook_size
        offsets = torch.arange(self.num_codebooks, device=indices.device) * num_codes
        flat_indices = (indices + offsets).reshape(-1)  # one ema_stats call for all codebooks
        counts, sums = ops.ema_stats(
            rows.reshape(-1, self.codebook_dim), flat_indices, self.num_codebooks * num_codes, self.backend)
        counts = counts.view(self.num_codebooks, num_codes)
        sums = sums.view(self.num_codebooks, num_codes, self.codebook_dim)
        global_counts, global_sums = all_reduce_stats(counts, sums) if sync else (counts, sums)
        if self.ema_update:
            if self.num_codebooks == 1:
                ema_update(self.embed, self.cluster_size, self.embed_avg, global_counts[0], global_sums[0],
                           self.decay, self.eps)
            else:
                for c in range(self.num_codebooks):
                    ema_update(self.embed[c], self.cluster_size[c], self.embed_avg[c], global_counts[c],
                               global_sums[c], self.decay, self.eps)
            if self.use_cosine_sim:
                self.embed.copy_(F.normalize(self.embed, dim=-1))
            if self.threshold_ema_dead_code > 0:
                revive_dead_codes_(self.embed, self.cluster_size, self.embed_avg, rows,
                                   self.threshold_ema_dead_code, sync)
        else:  # learnable codebook with dead-code revival: track usage only; revival runs before the next search
            self.cluster_size.lerp_(global_counts.view(self.cluster_size.shape), 1.0 - self.decay)
        return counts

    def _counts(self, indices: Tensor) -> Tensor:
        if self.num_codebooks == 1:
            return code_counts(indices, self.codebook_size).unsqueeze(0)
        return torch.stack([code_counts(indices[:, c], self.codebook_size) for c in range(self.num_codebooks)])

    def _run_kmeans_init(self, rows: Tensor, sync: bool) -> None:
        sync_init = sync and self.sync_kmeans
        if rows.shape[0] == 0 and not sync_init:
            return  # wait for a non-empty batch
        ops.kmeans_init_(
            self.embed if self.ema_update else self.embed.detach(),
            getattr(self, "cluster_size", None),
            self.embed_avg if self.ema_update else None,
            self.initted, rows, self.kmeans_iters, self.use_cosine_sim, sync_init, self.backend)
        self._kmeans_pending = False

    # ---- layout ----------------------------------------------------------------------------
    def _search_codebook(self) -> Tensor:
        """The codebook searched: embed, l2-normalised for a learnable cosine-similarity codebook."""
        if self.use_cosine_sim and self.learnable_codebook:
            return F.normalize(self.embed, dim=-1)
        return self.embed



def _check_arguments(owner: str, unsupported: dict, *, dim, codebook_size, heads, decay, eps, commitment_weight,
                     threshold_ema_dead_code, kmeans_iters, backend, codebook_dim, learnable_codebook, ema_update,
                     rotation_trick) -> None:
    """FastVectorQuantizer's constructor arguments, each checked with a message naming it."""
    reject_unsupported(owner, unsupported, VECTOR_QUANTIZE_UNSUPPORTED)
    if rotation_trick not in STRAIGHT_THROUGH_ROTATION_TRICK:
        raise ValueError(f"{owner} does not implement rotation_trick={rotation_trick!r}; "
                         "it uses the straight-through estimator (rotation_trick None or False)")
    check_positive_int("dim", dim)
    check_positive_int("codebook_size", codebook_size)
    check_positive_int("heads", heads)
    check_fraction("decay", decay)
    check_non_negative("eps", eps)
    check_non_negative("commitment_weight", commitment_weight)
    check_non_negative("threshold_ema_dead_code", threshold_ema_dead_code)
    if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 0:
        raise ValueError(f"kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
    check_backend_argument(backend)
    if dim % heads:
        raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
    if codebook_dim is not None and codebook_dim != dim // heads:
        raise ValueError(f"codebook_dim must be None or dim // heads == {dim // heads} (fastvq splits x into "
                         f"heads without projections), got codebook_dim={codebook_dim!r}")
    if learnable_codebook is not None and bool(learnable_codebook) == bool(ema_update):
        raise ValueError(
            f"learnable_codebook={learnable_codebook} conflicts with ema_update={ema_update}: the codebook is "
            "learned either by EMA (ema_update=True) or by gradient (ema_update=False, learnable_codebook=True)"
        )


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _after_load_state_dict(module: FastVectorQuantizer, incompatible_keys) -> None:
    # A loaded `initted` may be True or False: let the init op look at it again.
    module._kmeans_pending = module.kmeans_init
