"""What every backend implements. Inputs arrive validated (ranks, shapes, devices) by fastvq.ops.

Shapes: x (N, d) with N >= 1, codebook (K, d) with K >= 1, indices int64 (N,).
Arithmetic is float32 (the torch backend uses float64 for float64 inputs).
"""
from __future__ import annotations

from torch import Tensor


class Backend:
    name: str = "base"

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all in this install, or None."""
        raise NotImplementedError

    def describe(self) -> str:
        """Build and mode details for ``python -m fastvq.info`` ("" when there is nothing to add)."""
        return ""

    def not_supported_reasons(self, *tensors: Tensor) -> list[str]:
        """Why this backend cannot run on these tensors (device, dtype, build); empty if it can."""
        raise NotImplementedError

    def empty_cache(self) -> None:
        """Release what this backend keeps between calls (the cpu backend: packed codebooks)."""

    def release(self, tensor: Tensor) -> None:
        """Forget what this backend keeps for ``tensor`` alone, for a caller done with it (nothing by default)."""

    def search_precision(self, device, x_dtype, codebook_dtype) -> str:
        """How this backend's searches multiply x by the codebook, named as reference.nearest_code_slack's
        ``precision`` (the slack the judge allows them): "ieee", float32 products and sums."""
        return "ieee"

    def op_not_supported_reasons(self, op: str) -> list[str]:
        """Why this backend does not implement the op named ``op`` at all (whatever the tensors); empty if it does."""
        return []

    def op_fallbacks(self) -> dict[str, str]:
        """Ops this backend runs with fastvq.reference instead of its own kernel, each with the reason."""
        return {}

    def nearest_code(self, x: Tensor, codebook: Tensor, want_quantized: bool,
                     hint: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """indices int64 (N,), sqdist float32 (N,), and quantized (N, d) in x.dtype if asked. ``hint``
        (int64 (N,) codes in range, or None) may set where a search starts; it never changes the outputs."""
        raise NotImplementedError

    def nearest_codes(self, x: Tensor, codebook: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """indices int64 (N, k): each row's k nearest codes, nearest first, ties to the lower index;
        sqdist (N, k) of those codes in the compute dtype. 1 <= k <= min(K, NEAREST_CODES_MAX_K)."""
        raise NotImplementedError

    def sample_code(self, x: Tensor, codebook: Tensor, temperature: float, seed: int, cosine: bool) -> Tensor:
        """indices int64 (N,): fastvq.reference.sample_code's Gumbel-max draw, its noise hash bit for bit."""
        raise NotImplementedError

    def ema_stats(self, x: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
        """counts float32 (K,), sums float32 (K, d)."""
        raise NotImplementedError

    def quantize_backward(
        self,
        grad_quantized: Tensor,
        x: Tensor,
        codebook: Tensor,
        indices: Tensor,
        commit_scale: Tensor,
        codebook_scale: Tensor,
        need_grad_x: bool,
        need_grad_codebook: bool,
        rotation_trick: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """grad_x = G + commit_scale·(x − e_idx) in x.dtype, where G = grad_q (straight-through)
        or, with ``rotation_trick``, G = (‖q‖/‖x‖)·Rᵀ·grad_q (fastvq.reference.quantize_backward);
        grad_codebook_k = codebook_scale·Σ_{idx_i=k}(e_k − x_i) in codebook.dtype.
        The scales are 0-dim tensors so GPU backends need not synchronise."""
        raise NotImplementedError

    def residual_level_backward_(
        self,
        grad_x: Tensor,
        residual: Tensor,
        grad_quantized: Tensor,
        codebook: Tensor,
        indices: Tensor,
        commit_scale: Tensor,
        rotation_trick: bool,
        accumulate: bool,
        advance: bool,
    ) -> Tensor | None:
        """fastvq.ops.residual_level_backward_ in one fused pass, or None where this backend has no kernel for
        it (the op then composes quantize_backward and torch ops). With advance and the rotation trick, the
        rows left unchanged for the caller to rebuild are flagged in the returned (M,) tensor (nonzero)."""
        return None
