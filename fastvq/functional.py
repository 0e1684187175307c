"""The public functions: argument checks, (..., d) reshaping, then the custom ops."""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .checks import (check_columns, check_float_tensor, check_indices, check_positive_int, check_rows_and_codebook,
                     check_vectors_and_codebook, shape_str)
from .dispatch import check_backend_name
from .numerics import NEAREST_CODES_MAX_K


def nearest_code(x: Tensor, codebook: Tensor, *, backend: str = "auto",
                 hint: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Nearest codebook row of each row of x.

    x (N, d), codebook (K, d) -> indices int64 (N,), sqdist (N,) (float64 for float64 x, else float32) where
    sqdist_i = ‖x_i − codebook[indices_i]‖². Ties go to the lowest index.

    ``hint`` (int64 (N,), codes in [0, K)): a guess of each row's code, e.g. its code in the last k-means
    iteration; the cpu backend's int8 prefilter starts each row's scan from it, which is faster when the
    guess is near. The result is the same for any hint. A hinted call of at least 1024 rows also keeps the
    rows' int8 copy for the next hinted call on the same x (unchanged: same storage, shape, strides and
    version counter); after writing x in a way that bypasses the version counter, call fastvq.empty_cache().
    """
    check_rows_and_codebook(x, codebook)
    check_backend_name(backend)
    if hint is not None and not isinstance(hint, Tensor):
        raise TypeError(f"hint must be a torch.Tensor or None, got {type(hint).__name__}")
    search = ops.nearest_code_eager if ops.op_call_is_unobserved(x, codebook, hint) else ops.nearest_code
    return search(x, codebook, backend, hint)


def nearest_codes(x: Tensor, codebook: Tensor, k: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The k nearest codebook rows of each row of x, nearest first.

    x (N, d), codebook (K, d), 1 <= k <= min(K, 64) -> indices int64 (N, k), sqdist (N, k) (float64 for
    float64 x, else float32) with sqdist_ij = ‖x_i − codebook[indices_ij]‖². Ties go to the lower index.
    k = 1 gives nearest_code's answer. Never builds the N×K distance matrix.
    """
    check_rows_and_codebook(x, codebook)
    check_positive_int("k", k)
    limit = min(codebook.shape[0], NEAREST_CODES_MAX_K)
    if k > limit:
        raise ValueError(f"k must be at most min(K, {NEAREST_CODES_MAX_K}) = {limit} "
                         f"for a codebook of shape {shape_str(codebook.shape)}, got {k}")
    check_backend_name(backend)
    search = ops.nearest_codes_eager if ops.op_call_is_unobserved(x, codebook) else ops.nearest_codes
    return search(x, codebook, k, backend)


def quantize(x: Tensor, codebook: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Replace each vector of x (..., d) by its nearest codebook row.

    Returns (quantized, indices): quantized has x's shape and dtype and value
    codebook[indices]; its gradient passes straight through to x and never to the
    codebook. indices has shape x.shape[:-1].
    """
    check_vectors_and_codebook(x, codebook)
    check_backend_name(backend)
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if ops.op_call_is_unobserved(rows, codebook):
        quantized, indices, _ = ops.quantize_search(rows, codebook, backend)
    else:
        quantized, indices, _ = ops.quantize(rows, codebook, 0.0, 0.0, backend)
    if rows is x:  # (N, d) already: two views fewer, ~30 µs of a streaming call with the caches cold
        return quantized, indices
    return quantized.view(x.shape), indices.view(x.shape[:-1])


def ema_stats(x: Tensor, indices: Tensor, num_codes: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-code counts (K,) and sums (K, d), of the rows of x (N, d) assigned by indices (N,): float64 for
    float64 x, else float32."""
    check_float_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, d), got {shape_str(x.shape)}")
    check_columns("x", x)
    check_indices(indices, x.shape[0], num_codes)
    if indices.device != x.device:
        raise ValueError(f"x and indices must be on the same device, got x on {x.device} and indices on {indices.device}")
    check_backend_name(backend)
    # The kernels scatter by these indices, so they are read back (one aminmax, one host synchronisation on a GPU)
    # rather than trusted: fastvq's modules call ops.ema_stats with the indices their own search made, and skip this.
    # Values can be read except on the meta device (shape-only tracing), where there are none.
    if indices.numel() and indices.device.type != "meta":
        low, high = torch.aminmax(indices)
        low, high = low.item(), high.item()
        if low < 0 or high >= num_codes:
            raise ValueError(f"indices must lie in [0, num_codes) = [0, {num_codes}), got values in [{low}, {high}]")
    return ops.ema_stats(x, indices, num_codes, backend)
