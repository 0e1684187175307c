"""fastvq's torch.library custom ops: schema, fake implementation and autograd, in one place.

    fastvq::nearest_code(x, codebook, backend) -> (indices, sqdist)
    fastvq::quantize(x, codebook, commitment_weight, codebook_weight, backend) -> (quantized, indices, loss)
    fastvq::quantize_backward(grad_quantized, x, codebook, indices, commit_scale, codebook_scale,
                              backend, need_grad_codebook) -> (grad_x, grad_codebook)
    fastvq::ema_stats(x, indices, num_codes, backend) -> (counts, sums)

x is (N, d) here; fastvq.functional reshapes (..., d) and checks arguments. The
backend string ("auto" or a name) is resolved when the op runs, so tracing with
torch.compile never looks at tensor values. N = 0 never reaches a backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import check_backend_name, resolve


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- nearest_code ---------------------------------------------------------------------------
@torch.library.custom_op("fastvq::nearest_code", mutates_args=())
def nearest_code(x: Tensor, codebook: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if x.shape[0] == 0:
        check_backend_name(backend)
        return _empty_indices(x), x.new_empty((0,), dtype=torch.float32)
    indices, sqdist, _ = resolve(backend, x, codebook).nearest_code(x, codebook, want_quantized=False)
    return indices, sqdist


@nearest_code.register_fake
def _(x, codebook, backend):
    return _empty_indices(x), x.new_empty((x.shape[0],), dtype=torch.float32)


def _empty_indices(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0],), dtype=torch.int64)


# ---- quantize (search + gather + loss, with the straight-through backward) -----------------
@torch.library.custom_op("fastvq::quantize", mutates_args=())
def quantize(
    x: Tensor, codebook: Tensor, commitment_weight: float, codebook_weight: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    num_rows, dim = x.shape
    if num_rows == 0:
        check_backend_name(backend)
        return x.new_empty((0, dim)), _empty_indices(x), x.new_zeros((), dtype=loss_dtype(x.dtype))
    indices, sqdist, quantized = resolve(backend, x, codebook).nearest_code(x, codebook, want_quantized=True)
    # mean((x − q)²) over all N·d entries is Σ sqdist / (N·d); both loss terms have that value.
    weight = (commitment_weight + codebook_weight) / (num_rows * dim)
    loss = (sqdist.sum(dtype=torch.float64) * weight).to(loss_dtype(x.dtype))
    return quantized, indices, loss


@quantize.register_fake
def _(x, codebook, commitment_weight, codebook_weight, backend):
    return torch.empty_like(x), _empty_indices(x), x.new_empty((), dtype=loss_dtype(x.dtype))


def _setup_quantize(ctx, inputs, output):
    x, codebook, commitment_weight, codebook_weight, backend = inputs
    _, indices, _ = output
    ctx.save_for_backward(x, codebook, indices)
    ctx.commitment_weight = commitment_weight
    ctx.codebook_weight = codebook_weight
    ctx.backend = backend


def _quantize_backward_rule(ctx, grad_quantized, grad_indices, grad_loss):
    x, codebook, indices = ctx.saved_tensors
    num_rows, dim = x.shape
    # d/dx of w·mean((x − q)²) is w·2(x − q)/(N·d); the codebook term mirrors it.
    scale = 2.0 / max(num_rows * dim, 1)
    grad_loss = grad_loss.to(torch.float32)
    need_grad_codebook = ctx.needs_input_grad[1] and ctx.codebook_weight != 0.0
    grad_x, grad_codebook = quantize_backward(
        grad_quantized,
        x,
        codebook,
        indices,
        grad_loss * (ctx.commitment_weight * scale),
        grad_loss * (ctx.codebook_weight * scale),
        ctx.backend,
        need_grad_codebook,
    )
    return grad_x, (grad_codebook if need_grad_codebook else None), None, None, None


quantize.register_autograd(_quantize_backward_rule, setup_context=_setup_quantize)


# ---- quantize_backward ----------------------------------------------------------------------
@torch.library.custom_op("fastvq::quantize_backward", mutates_args=())
def quantize_backward(
    grad_quantized: Tensor,
    x: Tensor,
    codebook: Tensor,
    indices: Tensor,
    commit_scale: Tensor,
    codebook_scale: Tensor,
    backend: str,
    need_grad_codebook: bool,
) -> tuple[Tensor, Tensor]:
    """grad_codebook is an empty (0,) tensor when not needed (a custom op cannot return None)."""
    if x.shape[0] == 0:
        check_backend_name(backend)
        grad_codebook = torch.zeros_like(codebook) if need_grad_codebook else codebook.new_empty((0,))
        return torch.empty_like(x), grad_codebook
    grad_x, grad_codebook = resolve(backend, x, codebook).quantize_backward(
        grad_quantized, x, codebook, indices, commit_scale, codebook_scale,
        need_grad_x=True, need_grad_codebook=need_grad_codebook,
    )
    return grad_x, (grad_codebook if need_grad_codebook else codebook.new_empty((0,)))


@quantize_backward.register_fake
def _(grad_quantized, x, codebook, indices, commit_scale, codebook_scale, backend, need_grad_codebook):
    return torch.empty_like(x), (torch.empty_like(codebook) if need_grad_codebook else codebook.new_empty((0,)))


# ---- ema_stats ------------------------------------------------------------------------------
@torch.library.custom_op("fastvq::ema_stats", mutates_args=())
def ema_stats(x: Tensor, indices: Tensor, num_codes: int, backend: str) -> tuple[Tensor, Tensor]:
    """Per-code counts (K,) and sums (K, d), float32. Indices must lie in [0, num_codes)."""
    if x.shape[0] == 0:
        check_backend_name(backend)
        return (x.new_zeros((num_codes,), dtype=torch.float32),
                x.new_zeros((num_codes, x.shape[1]), dtype=torch.float32))
    return resolve(backend, x).ema_stats(x, indices, num_codes)


@ema_stats.register_fake
def _(x, indices, num_codes, backend):
    return (x.new_empty((num_codes,), dtype=torch.float32),
            x.new_empty((num_codes, x.shape[1]), dtype=torch.float32))
