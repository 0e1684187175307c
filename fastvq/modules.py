"""FastVectorQuantizer: a drop-in for vector-quantize-pytorch's VectorQuantize on fastvq's kernels."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers torch.ops.fastvq.*)
from .checks import check_float_tensor, check_fraction, check_non_negative, check_positive_int, shape_str
from .reference import ema_update


class FastVectorQuantizer(nn.Module):
    """Vector quantizer with an EMA (default) or gradient-learned codebook.

    forward(x) takes x of shape (..., dim), channel-last, and returns
    ``(quantized, indices, loss)``: quantized has x's shape and dtype and the
    straight-through gradient; indices has shape x.shape[:-1]; loss is a scalar,
    commitment_weight·mean((x − sg(q))²), plus mean((sg(x) − q)²) when the codebook
    is learned by gradient (``ema_update=False``).

    Training with ``ema_update=True`` runs, in this order: search against the
    current codebook, quantize with those rows, the loss, then the EMA update of
    ``cluster_size``, ``embed_avg`` and ``embed`` (Laplace-smoothed). Eval mode
    changes no state. Half-precision inputs are computed in float32 and returned in
    their own dtype; the codebook state is float32.
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
    ):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("codebook_size", codebook_size)
        check_fraction("decay", decay)
        check_non_negative("eps", eps)
        check_non_negative("commitment_weight", commitment_weight)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.decay = float(decay)
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        self.ema_update = bool(ema_update)
        self.backend = backend

        embed = torch.empty(codebook_size, dim)
        nn.init.kaiming_uniform_(embed)  # the initialisation VectorQuantize uses
        if self.ema_update:
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_avg", embed.clone())
        else:
            self.embed = nn.Parameter(embed)

    @property
    def codebook(self) -> Tensor:
        return self.embed

    def extra_repr(self) -> str:
        mode = "ema" if self.ema_update else "learnable"
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook={mode}, decay={self.decay}, "
                f"commitment_weight={self.commitment_weight}, backend={self.backend!r}")

    @torch.no_grad()
    def set_codebook(self, codebook: Tensor) -> None:
        """Replace the codebook; in EMA mode also reset cluster_size to 1 and embed_avg to it."""
        check_float_tensor("codebook", codebook)
        expected = (self.codebook_size, self.dim)
        if tuple(codebook.shape) != expected:
            raise ValueError(f"codebook must have shape {shape_str(expected)}, got {shape_str(codebook.shape)}")
        self.embed.copy_(codebook)
        if self.ema_update:
            self.cluster_size.fill_(1.0)
            self.embed_avg.copy_(codebook)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codebook vectors for integer indices of any shape: (...) -> (..., dim)."""
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            got = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
            raise TypeError(f"indices must be an int64 or int32 tensor, got {got}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, codebook_size) = [0, {self.codebook_size}), "
                             f"got values in [{int(indices.min())}, {int(indices.max())}]")
        return self.embed[indices.long()]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        check_float_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., dim) with dim == {self.dim}, got {shape_str(x.shape)}")
        rows = x.reshape(-1, self.dim)
        codebook_weight = 0.0 if self.ema_update else 1.0
        ema_training = self.training and self.ema_update
        # The EMA step rewrites embed in place; backward needs the rows this forward used.
        codebook = self.embed.clone() if ema_training else self.embed
        quantized, indices, loss = torch.ops.fastvq.quantize(
            rows, codebook, self.commitment_weight, codebook_weight, self.backend
        )
        if ema_training:
            self._ema_step(rows.detach(), indices)
        return quantized.view(x.shape), indices.view(x.shape[:-1]), loss

    @torch.no_grad()
    def _ema_step(self, rows: Tensor, indices: Tensor) -> None:
        counts, sums = torch.ops.fastvq.ema_stats(rows, indices, self.codebook_size, self.backend)
        ema_update(self.embed, self.cluster_size, self.embed_avg, counts, sums, self.decay, self.eps)
