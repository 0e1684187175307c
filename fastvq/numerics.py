"""Numeric rules every layer shares: the arithmetic dtype, the kernels' dtypes, and the
deterministic-reduction switch with its sort-by-code helper."""
from __future__ import annotations

import os

import torch
from torch import Tensor

# Input dtypes the fused kernels (cpu, triton, cuda) accept; float64 runs on the torch backend.
KERNEL_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

DETERMINISTIC_ENV_VAR = "FASTVQ_DETERMINISTIC"

# The largest k of nearest_codes: each kernel keeps a sorted list of k (value, index) pairs per row.
NEAREST_CODES_MAX_K = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fastvq computes distances, losses and statistics in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def deterministic() -> bool:
    """Whether GPU reductions use sort-and-segment sums instead of float atomics (bitwise reproducible).

    On when ``torch.use_deterministic_algorithms(True)`` is in force or the environment
    variable FASTVQ_DETERMINISTIC=1 is set. The CPU kernels are always deterministic.
    """
    if torch.are_deterministic_algorithms_enabled():
        return True
    return os.environ.get(DETERMINISTIC_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def sort_by_code(indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """(perm, offsets): rows perm[offsets[k]:offsets[k+1]] have index k, in row order.

    Indices outside [0, num_codes) fall outside every segment and are ignored.
    """
    sorted_indices, perm = torch.sort(indices, stable=True)
    boundaries = torch.arange(num_codes + 1, device=indices.device, dtype=indices.dtype)
    return perm, torch.searchsorted(sorted_indices, boundaries)
