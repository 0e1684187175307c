"""
fastvq CPU kernels (OpenMP + run-time AVX2 dispatch). Arrays: float32/int64, C-contiguous, CPU.
Bindings: csrc/cpu/bindings.cpp; each kernel names its source file.
"""

from collections.abc import Sequence
from typing import Annotated

from numpy.typing import NDArray


def nearest_code(x: Annotated[NDArray, dict(writable=False)], codebook: Annotated[NDArray, dict(writable=False)], indices_out: NDArray, sqdist_out: NDArray, quantized_out: NDArray | None = None, num_threads: int = 0, *, cache_key: Sequence[int] = [], hint: Annotated[NDArray, dict(writable=False)] | None = None, rows_key: Sequence[int] = []) -> None:
    """
    indices_out[i] = argmin_k ||x[i] - codebook[k]||^2 (ties -> lowest k), sqdist_out[i] = that
    squared distance (computed directly), quantized_out[i] = codebook[indices_out[i]] if given.
    num_threads <= 0 uses the OpenMP default. The search runs around search_centre(codebook); a
    finite code or row too far from it raises ValueError. cache_key (ints that change whenever the
    caller's codebook may have: identity, data pointer, shape, strides, version) reuses a cached pack;
    empty: pack afresh. hint (int64 (N,), optional): a guess of each row's code (e.g. its last k-means
    assignment) where the int8 prefilter starts its scan; any hint gives the same outputs. rows_key (x's
    cache_key): a hinted call of >= 1024 rows keeps its int8 rows for the next hinted call with the same
    rows_key and search centre (k-means), which skips quantizing them; the outputs are the same.
    Source: csrc/cpu/nearest_code.cpp (micro-kernels: csrc/cpu/search_tile_*.cpp).
    """

def nearest_codes(x: Annotated[NDArray, dict(writable=False)], codebook: Annotated[NDArray, dict(writable=False)], indices_out: NDArray, sqdist_out: NDArray, num_threads: int = 0, *, cache_key: Sequence[int] = []) -> None:
    """
    Row i's topk = indices_out.shape[1] nearest codes (1 <= topk <= min(K, 64)), nearest first, ties to
    the lower index, into indices_out[i] and their squared distances (computed directly) into
    sqdist_out[i]. Non-finite distances count as +inf. Bitwise identical for any num_threads;
    cache_key and the search centre as in nearest_code.
    Source: csrc/cpu/nearest_codes.cpp (micro-kernels: csrc/cpu/search_tile_*.cpp, search_tile_topk_*).
    """

def search_centre(codebook: Annotated[NDArray, dict(writable=False)], centre_out: NDArray, num_threads: int = 0) -> None:
    """
    centre_out = the per-dimension centre the searches run around (fastvq.numerics.search_centre's
    rule). Source: csrc/cpu/pack_codebook.cpp.
    """

def empty_cache() -> int:
    """
    Drop every cached packed codebook and the kept int8 rows (nearest_code's rows_key); returns the bytes
    released (what a call is using is freed when it ends). Source: csrc/cpu/pack_codebook.cpp,
    csrc/cpu/prefilter_rows.cpp.
    """

def release_rows(rows_key: Sequence[int]) -> int:
    """
    Drop the int8 rows nearest_code kept under this rows_key, if those are the ones it keeps; returns the
    bytes released. Source: csrc/cpu/prefilter_rows.cpp.
    """

def pack_cache_bytes() -> int:
    """
    Bytes of packed codebooks the cache holds now (bounded by 256 MiB of idle packs).
    """

def sample_code(x: Annotated[NDArray, dict(writable=False)], codebook: Annotated[NDArray, dict(writable=False)], indices_out: NDArray, temperature: float, seed: int, cosine: bool, num_threads: int = 0) -> None:
    """
    indices_out[i] = argmin_k of vqp's -logit (sqrt(max(|x_i - e_k|^2, 1e-8)), or -x_i.e_k with cosine) minus
    float32(temperature * Gumbel noise hashed from (seed, i, k)), ties to the lowest k: a draw from
    softmax(logits / temperature), bit for bit fastvq.reference.sample_code's noise.
    Source: csrc/cpu/sample_code.cpp.
    """

def kmeanspp_accept(gram: Annotated[NDArray, dict(writable=False)], norms: Annotated[NDArray, dict(writable=False)], pool_rows: Annotated[NDArray, dict(writable=False)], uniform: Annotated[NDArray, dict(writable=False)], old: Annotated[NDArray, dict(writable=False)], block: int, kept_out: NDArray) -> int:
    """
    k-means++'s block acceptance (fastvq.kmeans_seeding._accept): proposal i is kept when uniform[i] *
    old[i] < current[i], current starting at old and lowered by each kept proposal i to (norms[i] +
    norms[j]) - 2 gram[i, j] (0 where pool_rows[i] == pool_rows[j]) for the later proposals j; at most
    block kept. Writes their indices to kept_out, returns how many. Source: csrc/cpu/kmeanspp_accept.cpp.
    """

def ema_stats(x: Annotated[NDArray, dict(writable=False)], indices: Annotated[NDArray, dict(writable=False)], counts_out: NDArray, sums_out: NDArray, num_threads: int = 0) -> None:
    """
    counts_out[k] = #{i: indices[i] == k}, sums_out[k] = sum of x[i] over those i (overwritten).
    Bitwise identical for any num_threads. Source: csrc/cpu/ema_stats.cpp.
    """

def quantize_backward(grad_quantized: Annotated[NDArray, dict(writable=False)] | None, x: Annotated[NDArray, dict(writable=False)], codebook: Annotated[NDArray, dict(writable=False)], indices: Annotated[NDArray, dict(writable=False)], commit_scale: float, codebook_scale: float, grad_x_out: NDArray | None = None, grad_codebook_out: NDArray | None = None, num_threads: int = 0, *, rotation_trick: bool = False) -> None:
    """
    grad_x_out = G + commit_scale * (x - codebook[indices]), G = grad_quantized (None = 0) or, with
    rotation_trick, the rotation trick's (|q|/|x|) R^T grad_quantized (fastvq.reference.quantize_backward);
    grad_codebook_out[k] = codebook_scale * sum over indices[i] == k of (codebook[k] - x[i]).
    Bitwise identical for any num_threads. Source: csrc/cpu/quantize_backward.cpp.
    """

def residual_level_backward(grad_quantized: Annotated[NDArray, dict(writable=False)], residual: NDArray, codebook: Annotated[NDArray, dict(writable=False)], indices: Annotated[NDArray, dict(writable=False)], commit_scale: float, rotation_trick: bool, accumulate: bool, grad_x: NDArray, tiny_out: NDArray | None = None, num_threads: int = 0) -> None:
    """
    One level of ResidualVQ's greedy backward: grad_x = (accumulate: grad_x +) quantize_backward's grad_x
    of (grad_quantized, residual, codebook, indices, commit_scale, rotation_trick); with tiny_out (uint8,
    (N,)), residual -= codebook[indices] in place, except on rows flagged in tiny_out (rotation trick
    only: |residual| may be below eps, rebuilt by the caller). Source: csrc/cpu/residual_level_backward.cpp.
    """

def simd_level() -> str:
    """
    The nearest_code kernel the dispatcher picks now: 'avx512', 'avx2' or 'portable'.
    """

def best_simd_level() -> str:
    """The highest level this CPU and build support."""

def set_simd_level(level: str) -> None:
    """
    Force 'portable', or 'avx2'/'avx512' if supported; 'auto' restores the best. ValueError otherwise.
    """

def fma_peak(level: str = '', num_threads: int = 0, seconds: float = 0.2) -> float:
    """
    The machine's fp32 FMA peak in GFLOP/s: independent FMA chains on num_threads threads (<= 0: the
    OpenMP default) at `level` ('' = simd_level(), else 'portable', 'avx2' or 'avx512' if supported;
    ValueError otherwise), the best of 4 rounds of about seconds / 4. The benchmark's yardstick.
    Source: csrc/cpu/fma_peak.cpp (chains: csrc/cpu/fma_peak_avx2.cpp, fma_peak_avx512.cpp).
    """

def int8_product_ratio() -> float:
    """
    int8 multiply-adds per second (AVX-512 VNNI vpdpbusd) over fp32 multiply-adds per second (AVX-512 FMA)
    on one core, measured once per process (~1 ms, at the first call) and kept; 0.0 without AVX-512 VNNI.
    4.0 on an AMD Zen 5; about 2 expected where the 512-bit vpdpbusd issues at half the FMA's rate. The
    prefilter's 'auto' takes the VNNI scan from smaller codebooks where it is at least 3
    (prefilter_reason). Source: csrc/cpu/int8_speed.cpp.
    """

def fma_burst(level: str = '', num_threads: int = 0, rounds: int = 65536) -> float:
    """
    One burst of the same FMA chains as fma_peak, `rounds` rounds on each of num_threads threads, untimed:
    returns the flops done (ValueError on a bad level or rounds outside [1, 2^40]). The benchmark times it
    in each CPU case's alternating rounds. Source: csrc/cpu/fma_peak.cpp.
    """

def set_prefilter(mode: str) -> None:
    """
    nearest_code's int8 prefilter (AVX2, AVX-512 VNNI or AMX-INT8; exact: bitwise the float32 search's
    outputs): 'auto' (default: where prefilter_reason is empty), 'always' (any shape the kernel takes),
    or 'off'. ValueError otherwise. Source: csrc/cpu/nearest_code_prefilter.cpp.
    """

def prefilter_mode() -> str:
    """The mode set_prefilter set: 'auto', 'always' or 'off'."""

def set_prefilter_kernel(kernel: str) -> None:
    """
    The prefilter scan's kernel: 'auto' (at SIMD level avx512, AMX-INT8 tiles where the CPU and OS allow,
    else AVX-512 VNNI, VNNI for a call of fewer than 12 rows; at level avx2, AVX2), 'vnni', 'amx' or
    'avx2' (the AVX2 scan at level avx512 too); ValueError where unavailable. Same outputs.
    """

def prefilter_kernel() -> str:
    """
    The scan kernel the prefilter uses now for calls of 12 rows or more: 'amx', 'vnni', 'avx2', or ''
    (none at this SIMD level: prefilter_reason says why).
    """

def prefilter_reason(n: int, k: int, d: int) -> str:
    """
    Why nearest_code of n rows against K codes of dimension d runs without the prefilter now; '' when
    it tries it (a call can still decline at run time: prefilter_stats).
    """

def prefilter_stats() -> dict:
    """
    Counts since import: calls answered through the prefilter, rows of those searched over every panel
    (their candidates overflowed), and calls that declined it at run time (a non-finite or out-of-range
    row, or scales out of float32's normal range) and ran the full search, the codes the scan listed as
    candidates, those scored again in float32 (within the final threshold), and 'auto' calls that ran the
    float32 search rather than build a fresh codebook's int8 copy for fewer than 256 rows; amx_calls:
    the answered calls whose scan ran on AMX tiles; kept_rows_calls: those that took their rows' int8
    copy from an earlier call (rows_key).
    """

def openmp_enabled() -> bool: ...

def max_threads() -> int: ...
