"""ResidualVQ: a stack of FastVectorQuantizers, level i quantizing what levels < i left over."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_float_tensor, check_positive_int, shape_str
from ..numerics import compute_dtype
from .compat import RESIDUAL_FORWARD_UNSUPPORTED, RESIDUAL_VQ_UNSUPPORTED, reject_unsupported
from .layout import ChannelLayout
from .vector_quantizer import FastVectorQuantizer
from .stats import CodebookStats


class ResidualVQ(nn.Module):
    """Residual vector quantization (SoundStream's Algorithm 1), vector-quantize-pytorch's names.

    ``ResidualVQ(dim, codebook_size, num_quantizers, **vq_kwargs)``; codebook_size may
    be a tuple with one size per level (then num_quantizers may be omitted). Every
    other keyword goes to each level's FastVectorQuantizer (decay, kmeans_init,
    threshold_ema_dead_code, use_cosine_sim, ema_update, backend, ...).

    forward(x) with x (..., dim) (or (B, dim, ...) with ``channel_last=False`` /
    ``accept_image_fmap``) returns ``(quantized, indices, losses)``:
    quantized = Σ_i q_i, in x's shape and dtype, with the straight-through gradient
    (∂quantized/∂x = I); indices (..., num_quantizers); losses (num_quantizers,), level
    i's loss on its residual r_i = x − Σ_{j<i} q_j. Residuals are float32 (float64 for
    float64 x) whatever x's dtype.
    """

    def __init__(self, dim: int, codebook_size: int | tuple[int, ...], num_quantizers: int | None = None, *,
                 codebook_dim: int | None = None, channel_last: bool = True, accept_image_fmap: bool = False,
                 accept_3d_fmap: bool = False, **vq_kwargs):
        super().__init__()
        reject_unsupported(type(self).__name__, {k: v for k, v in vq_kwargs.items() if k in RESIDUAL_VQ_UNSUPPORTED},
                           RESIDUAL_VQ_UNSUPPORTED)
        vq_kwargs = {k: v for k, v in vq_kwargs.items() if k not in RESIDUAL_VQ_UNSUPPORTED}
        check_positive_int("dim", dim)
        sizes = tuple(codebook_size) if isinstance(codebook_size, (tuple, list)) else None
        if sizes is None:
            check_positive_int("codebook_size", codebook_size)
            if num_quantizers is None:
                raise ValueError("num_quantizers must be given when codebook_size is an int")
            check_positive_int("num_quantizers", num_quantizers)
            sizes = (codebook_size,) * num_quantizers
        elif num_quantizers is not None and num_quantizers != len(sizes):
            raise ValueError(f"codebook_size must have one size per level (num_quantizers == {num_quantizers}), "
                             f"got {len(sizes)} sizes")
        if not sizes:
            raise ValueError("codebook_size must hold at least one size")
        if codebook_dim is not None and codebook_dim != dim:
            raise ValueError(f"codebook_dim must be None or dim == {dim} (fastvq has no projections), "
                             f"got codebook_dim={codebook_dim!r}")
        self.dim = dim
        self.num_quantizers = len(sizes)
        self.codebook_sizes = sizes
        # The layout is handled here once; every level sees channel-last residuals.
        self.layout = ChannelLayout(channel_last, accept_image_fmap, accept_3d_fmap)
        self.layers = nn.ModuleList(FastVectorQuantizer(dim, size, **vq_kwargs) for size in sizes)

    @property
    def codebook_size(self) -> int:
        return self.codebook_sizes[0]

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """(num_quantizers, K, dim) when all levels have the same K, else a tuple of (K_i, dim)."""
        codebooks = tuple(layer.codebook for layer in self.layers)
        return torch.stack(codebooks) if len(set(self.codebook_sizes)) == 1 else codebooks

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (..., num_quantizers) -> each level's codes (num_quantizers, ..., dim), channel-last."""
        if not isinstance(indices, Tensor) or indices.dim() == 0 or indices.shape[-1] != self.num_quantizers:
            got = shape_str(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"indices must have shape (..., num_quantizers) with num_quantizers == "
                             f"{self.num_quantizers}, got {got}")
        return torch.stack([layer.get_codes_from_indices(indices[..., i]) for i, layer in enumerate(self.layers)])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """indices (..., num_quantizers) -> Σ of the levels' codes (..., dim), channel-last."""
        return self.get_codes_from_indices(indices).sum(0)

    def forward(self, x: Tensor, *, return_stats: bool = False, freeze_codebook: bool | None = None,
                **unsupported):
        """(quantized, indices, losses), plus a CodebookStats with one entry per level when ``return_stats``."""
        reject_unsupported(f"{type(self).__name__}.forward", unsupported, RESIDUAL_FORWARD_UNSUPPORTED)
        check_float_tensor("x", x)
        x_last = self.layout.to_sequence(x, self.dim)
        residual = x_last.to(compute_dtype(x.dtype))
        total = torch.zeros_like(residual)
        all_indices, losses, stats = [], [], []
        for layer in self.layers:
            out = layer(residual, return_stats=return_stats, freeze_codebook=freeze_codebook)
            codes = out[0].detach()
            total = total + codes
            residual = residual - codes
            all_indices.append(out[1])
            losses.append(out[2])
            if return_stats:
                stats.append(out[3])
        # Value Σ q_i exactly; gradient identity to x (x − sg(x) is 0 but carries the gradient).
        quantized = total.to(x.dtype) + (x_last - x_last.detach())
        quantized = self.layout.from_sequence(quantized, tuple(x.shape))
        indices = torch.stack(all_indices, dim=-1)
        indices = indices.reshape(*self.layout.indices_shape(tuple(x.shape)), self.num_quantizers)
        result = (quantized, indices, torch.stack(losses))
        if not return_stats:
            return result
        counts = [s.counts for s in stats]
        merged = CodebookStats(torch.stack([s.perplexity for s in stats]), torch.stack([s.utilization for s in stats]),
                               torch.stack(counts) if len(set(self.codebook_sizes)) == 1 else tuple(counts))
        return (*result, merged)
