"""ResidualVQ's greedy training step as one autograd node over all levels.

Level by level it does exactly what ``FastVectorQuantizer.forward`` does for a plain level (the
same ``_quantize_rows``: k-means init, search, rotation-trick value, EMA step, dead codes), but
autograd saves only the levels' input x, each level's searched codebook (K, d) and indices (M,),
not the L residuals (M, d). The backward recomputes residual i from x as the forward made it
(x − q_0 − … − q_{i−1}, each q_j the searched code with the rotation trick's value of tiny rows,
so bitwise the same) and runs each level's quantize_backward on it (ops.residual_level_backward_: one
pass a level on the cpu backend): the same gradient as the per-level graph (summed from the first level,
not the last) in O(1) residual buffers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .vector_quantizer import FastVectorQuantizer, _no_autocast

_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def can_fuse_levels(rvq, x: Tensor, mask) -> bool:
    """Whether the greedy step may run as one node: a float32 training step with a gradient to x,
    no mask, no shared codebook, no quant_grad_frac, and every level a plain, hook-free
    FastVectorQuantizer whose output is its searched code (one head, no projection, Euclidean
    distance, EMA or frozen codebook, straight-through or rotation-trick gradient, commitment loss
    by mean squared error). Anything else takes the per-level graph."""
    if not (rvq.training and torch.is_grad_enabled() and x.requires_grad) or mask is not None:
        return False
    if torch.compiler.is_compiling() or x.dtype != torch.float32 or x.dim() < 2 or x.shape[-1] != rvq.codebook_dim:
        return False
    if rvq.shared_codebook or rvq.quant_grad_frac > 0 or _hooked(torch.nn.modules.module, "_global"):
        return False
    return all(_plain_level(layer, x) for layer in rvq.layers)


def _hooked(owner, prefix: str = "") -> bool:
    return any(getattr(owner, prefix + name, None) for name in _MODULE_HOOKS)


def _plain_level(layer, x: Tensor) -> bool:
    return (type(layer).forward is FastVectorQuantizer.forward and layer.training and not _hooked(layer)
            and layer.heads == 1 and not layer.has_projections and not layer.use_cosine_sim
            and not layer.learnable_codebook and not layer._codebook.learnable_codebook
            and not layer.straight_through and not layer.stochastic_sample_codes
            and not layer.commitment_use_cross_entropy_loss and not layer.has_codebook_diversity_loss
            and not layer.has_codebook_orthogonal_loss and layer.route_gradients_to_input
            and not layer.layout.channel_first(x.dim()) and x.device == layer._codebook.embed.device)


def fused_greedy_levels(rvq, x: Tensor, freeze_codebook, last: int) -> tuple[Tensor, Tensor, Tensor]:
    """quantized (x's shape), indices (..., L) (−1 for levels after ``last``) and losses (L,) of
    levels 0..last, as ResidualVQ._greedy returns them."""
    return _GreedyLevels.apply(x, rvq, freeze_codebook, last)


class _GreedyLevels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rvq, freeze_codebook, last: int):
        rows = x.reshape(-1, x.shape[-1])
        residual, quantized_out = rows, None
        codebooks, all_indices, losses, weights = [], [], [], []
        for level in range(last + 1):
            layer = rvq.layers[level]
            frozen = layer.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
            with _no_autocast(x.device.type):
                quantized, indices, commit, _, codebook, _ = layer._quantize_rows(
                    residual.unsqueeze(0), None, residual.unsqueeze(0), frozen, True, None, None, False, False,
                    layer.sample_codebook_temp, None)
            quantized, indices = quantized[0], indices[0]
            codebooks.append(codebook[0])
            all_indices.append(indices)
            losses.append(layer.zero if commit is None else commit)
            weights.append((layer.commitment_weight if layer.has_commitment_loss else 0.0, layer.rotation_trick,
                            layer.backend))
            if level < last:  # the first level's input is the caller's x: the later ones reuse one buffer
                residual = rows - quantized if level == 0 else residual.sub_(quantized)
            quantized_out = quantized if quantized_out is None else quantized_out.add_(quantized)
        ctx.save_for_backward(rows, *codebooks, *all_indices)
        ctx.weights = weights
        ctx.input_shape = x.shape
        dropped = rvq.num_quantizers - last - 1
        indices = torch.stack(all_indices + [torch.full_like(all_indices[0], -1)] * dropped, dim=-1)
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)  # no zero (M, L) gradient for the indices
        return (quantized_out.view(x.shape), indices.view(*x.shape[:-1], rvq.num_quantizers),
                torch.stack([loss.to(torch.float32) for loss in losses] + [zero] * dropped))

    @staticmethod
    def backward(ctx, grad_quantized: Tensor, grad_indices, grad_losses: Tensor):
        rows, *saved = ctx.saved_tensors
        levels = len(ctx.weights)
        codebooks, all_indices = saved[:levels], saved[levels:]
        if grad_quantized is None:
            grad_quantized = rows.new_zeros(rows.shape)
        if grad_losses is None:
            grad_losses = rows.new_zeros(levels)
        grad_quantized = grad_quantized.reshape(rows.shape).contiguous()  # once, not once a level (e.g. expanded)
        scale = 2.0 / max(rows.numel(), 1)  # d/dx of w·mean((x − q)²), as quantize's backward rule
        # Level by level: the level's gradient into grad, and its input advanced to the next level's in place,
        # bitwise as the forward made it (one pass a level on the cpu backend: ops.residual_level_backward_).
        grad = torch.empty_like(rows, memory_format=torch.contiguous_format)  # the op writes both; rows may be
        residual = rows.clone(memory_format=torch.contiguous_format)  # the caller's x
        for level, (weight, rotation_trick, backend) in enumerate(ctx.weights):
            grad_loss = grad_losses[level].to(torch.float32)
            ops.residual_level_backward_(grad, residual, grad_quantized, codebooks[level], all_indices[level],
                                         grad_loss * (weight * scale), backend, rotation_trick, level > 0,
                                         level < levels - 1)
        return grad.view(ctx.input_shape), None, None, None
