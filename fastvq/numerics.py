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


def finite_rows(x: Tensor) -> Tensor:
    """(N,) bool: the rows of x (N, d) with no NaN or Inf. A NaN or Inf makes its row's sum non-finite, and
    a row sum is one pass with no (N, d) mask (``isfinite(x).all(1)`` costs a quarter of a 1024-code
    search); only when some sum is not finite (or overflows) are the entries tested one by one."""
    finite = torch.isfinite(x.sum(dim=1))
    return finite if bool(finite.all()) else torch.isfinite(x).all(dim=1)


def search_centre(codebook: Tensor) -> Tensor:
    """(d,) float32: the point the fused kernels search around (issue 12, finding 5).

    Distances are translation invariant, but the kernels' ‖e‖² − 2x·e expansion cancels far from
    the origin, so they search x − c against e − c. Over the codebook rows whose entries are all
    finite, per dimension p, with the mean m_p and population std s_p in float64:
    c_p = g_p·round(m_p / g_p) with g_p = 2^ceil(log2 s_p) when s_p > 0, else c_p = m_p
    (0 when no row is finite). Rounding to the power-of-two grid g_p keeps the centring exact
    on data whose values sit on a coarser grid (integers stay integers). Every backend uses this
    rule (csrc/cpu/pack_codebook.cpp computes it in C++; its float64 sums may differ in the last
    bit, which can move c by one grid step: any centre gives the same distances).
    """
    e = codebook.detach().to(torch.float64)
    finite = torch.isfinite(e).all(dim=1, keepdim=True)
    count = finite.sum().clamp_min(1)
    mean = torch.where(finite, e, 0.0).sum(0) / count
    std = ((torch.where(finite, e - mean, 0.0) ** 2).sum(0) / count).sqrt()
    mantissa, exponent = torch.frexp(std)  # std = mantissa·2^exponent, mantissa in [0.5, 1)
    grid = torch.ldexp(torch.ones_like(std), exponent - (mantissa == 0.5).to(exponent.dtype))
    return torch.where(std > 0, grid * torch.round(mean / grid), mean).to(torch.float32)


# The float32 searches support ‖v − c‖² <= FLT_MAX/8 for every finite code and row v (c = search_centre):
# then |2 x'·e'| <= FLT_MAX/4 and ‖x − e‖² <= FLT_MAX/2 cannot overflow (csrc/cpu/pack_codebook.h).
MAX_CENTRED_SQUARED_NORM = torch.finfo(torch.float32).max / 8


def search_range_error(what: str, row: int, squared_norm: float) -> ValueError:
    """The error for a finite codebook row (what="codebook", ‖e − c‖²) or x row (what="x", ‖x − c‖²)
    beyond MAX_CENTRED_SQUARED_NORM; the same words as the cpu kernels' (csrc/cpu/pack_codebook.cpp)."""
    symbol = "e" if what == "codebook" else "x"
    limit = MAX_CENTRED_SQUARED_NORM
    return ValueError(
        f"{what} row {row} is too far from the search centre: ||{symbol} - c||^2 = {squared_norm:.3g}; the float32 "
        f"search supports ||v - c||^2 <= FLT_MAX/8 = {limit:.3g} (||v - c|| <= {limit ** 0.5:.3g}) for every "
        f"finite code and row, where c is the per-dimension centre of the finite codes "
        f"(fastvq.numerics.search_centre)")


def first_out_of_range_code(codebook: Tensor, centred_norms: Tensor) -> Tensor:
    """0-dim int64 on the codebook's device: the first finite codebook row whose ‖e − c‖²
    (``centred_norms``, (K,) float32) is beyond MAX_CENTRED_SQUARED_NORM, or K if none. No host sync."""
    num_codes = codebook.shape[0]
    bad = torch.isfinite(codebook).all(dim=1) & ~(centred_norms <= MAX_CENTRED_SQUARED_NORM)
    rows = torch.arange(num_codes, device=codebook.device)
    return torch.where(bad, rows, num_codes).min()


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
