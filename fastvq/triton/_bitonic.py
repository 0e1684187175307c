"""Bitonic top-k on integer keys, for the top-k search (nearest_codes.py): per row of a 2-D tile,
the K smallest keys in descending order, and the merge of two sorted lists of K.

The networks are Triton's own (triton.language.standard: sort_impl, topk, bitonic_merge, after
https://www.doc.ic.ac.uk/~hlgr/pdfs/MassivelyParallelTopK.pdf): the tile is viewed as a hypercube
of 2s and each compare-and-swap pairs the two entries along one axis. The one change: an entry's
partner is (sum of the pair) − entry, in wrapping integer arithmetic, where Triton's library uses
an xor reduction. Both are exact on integers and compile to the same one-axis reduction, but
Triton's interpreter (how the tests run the kernels) evaluates the xor reduction element by
element in Python, about 100× slower than the sum.
"""
from __future__ import annotations

import triton.language as tl
from triton.runtime.jit import constexpr_function

from ._jit import device_function


@constexpr_function
def _log2(n):
    return int(n).bit_length() - 1


@constexpr_function
def _cube(n_dims):
    return [2] * n_dims


@constexpr_function
def _axis_shape(n_dims, j):
    """The shape that puts a length-2 axis at bit j of a flat position (bit 0 innermost)."""
    return [1] * (n_dims - j - 1) + [2] + [1] * j


@device_function
def _compare_and_swap(h, flip, j: tl.constexpr):
    n_dims: tl.constexpr = _log2(h.numel)
    partner = tl.sum(h, axis=n_dims - 1 - j, keep_dims=True) - h
    is_right = tl.reshape(tl.arange(0, 2), _axis_shape(n_dims, j))
    return tl.where((h > partner) != (flip ^ is_right).to(tl.int1), partner, h)


@device_function
def _merge(h, stage: tl.constexpr, order: tl.constexpr):
    """Sort each bitonic run of 2^stage entries: order 0 ascending, 1 descending, 2 alternating."""
    if order == 2:
        flip = tl.reshape(tl.arange(0, 2), _axis_shape(_log2(h.numel), stage))
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_and_swap(h, flip, stage - 1 - i)
    return h


@device_function
def smallest_descending(x, K: tl.constexpr):
    """(R, W) integers → (R, K): each row's K smallest, in descending order (K, W powers of two, 2 <= K <= W)."""
    log_n: tl.constexpr = _log2(x.shape[1])
    log_k: tl.constexpr = _log2(K)
    h = tl.reshape(x, _cube(_log2(x.numel)))
    for i in tl.static_range(1, log_k + 1):
        h = _merge(h, i, 2 if i < log_n else 1)
    for i in tl.static_range(log_k + 1, log_n + 1):
        h = tl.min(h, axis=_log2(h.numel) - 1 - log_k)  # the smaller half of each ascending/descending pair
        h = _merge(h, log_k, 2 if i < log_n else 1)
    return tl.reshape(h, [x.shape[0], K])


@device_function
def merge_ascending(ascending, descending):
    """Two (R, K) lists, one ascending and one descending → the K smallest of each row's union, ascending:
    min(a_j, d_j) is a bitonic sequence holding them, which one bitonic merge sorts (K >= 2)."""
    h = tl.minimum(ascending, descending)
    h = tl.reshape(h, _cube(_log2(h.numel)))
    h = _merge(h, _log2(ascending.shape[1]), 0)
    return tl.reshape(h, ascending.shape)
