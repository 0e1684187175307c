"""Shared test fixtures: the (backend, device) pairs every op test body runs on, input builders,
and the one tolerance table.

Every op test body takes the ``pair`` fixture and runs once per pair below. Inputs are built on
the CPU with a seeded generator and moved to the pair's device; results come back to the CPU and
are compared there against fastvq.reference (whose ``assert_nearest`` is the one judge of indices).
A pair that cannot run here skips with the dispatcher's own reason.

The ``torch`` backend is fastvq.reference itself, so it is not a pair: testing it against the
oracle would compare the oracle with itself (test_nearest_code.py has one smoke test of it).

Triton on CPU tensors runs in Triton's interpreter, which works only when triton was first
imported with TRITON_INTERPRET=1 (its own library is decorated at import, and a normal run
imports it earlier, through torch._dynamo). So ("triton", "cpu") runs only in a process started
with TRITON_INTERPRET=1; test_triton_interpreter.py starts one for the ``-k triton-cpu`` cases.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from fastvq import dispatch, reference

# ---- the tolerance table ---------------------------------------------------------------------
# Per-dtype tolerances for values computed by a kernel vs the fp32/fp64 oracle.
# Half-precision *inputs* are still computed in float32, so float32 bounds apply to
# sqdist and gradients; the half entries bound results rounded back to that dtype.
# The named rows are quantities that need their own bound; each says why.
TOLERANCES = {
    torch.float64: dict(atol=1e-6, rtol=1e-6),  # torch backend runs fp64 as fp64; sqdist is fp32
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    # sqdist of the chosen code: every kernel computes ‖x − e_idx‖² directly as a float32 sum of
    # d squares, so it is within d·u (u = 2⁻²⁴; < 1e-5 for d <= 160) of the exact value, relative.
    "sqdist": dict(atol=1e-6, rtol=1e-5),
    # What the cpu kernels form in double (per-code sums) or in two or three float32 operations per
    # element (grad_x) and round once to float32: a few ulps of the float64 value.
    "float64_accumulated": dict(atol=1e-6, rtol=1e-6),
    # k-means centroids after several float32 Lloyd iterations vs the same iterations in float64:
    # each iteration's rounding moves the next assignment's means a little, so errors compound.
    "centroids": dict(atol=1e-4, rtol=1e-4),
    # Two float64 expressions that differ by a couple of roundings (x + (q − x) vs q).
    "float64_roundings": dict(atol=1e-12, rtol=1e-12),
}


# ---- (backend, device) pairs -----------------------------------------------------------------
# The process was started with TRITON_INTERPRET=1: read once, before any test can set it.
STARTED_INTERPRETED = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
INTERPRETER_RUNNER = "test_triton_interpreter.py"

# Under the interpreter every Triton program runs as numpy in Python, a few milliseconds per
# (64 rows × 64 codes × 32 dims) tile it steps through (the interpreter's block sizes). Cases over
# this many tiles skip there, which keeps the whole triton-cpu run near 30 s; the odd sizes 1, 3,
# 33, 257 (N = 300), d = 130 (N = 7) and a non-contiguous case per op stay under it.
INTERPRETER_TILE_BUDGET = 60


@dataclass(frozen=True)
class Pair:
    backend: str
    device: str
    search_kernel: str = "triton"  # fastvq.triton.set_search_kernel, for the triton backend

    def __str__(self) -> str:
        kernel = "-gluon" if self.search_kernel == "gluon" else ""
        return f"{self.backend}{kernel}-{self.device}"

    @property
    def interpreted(self) -> bool:
        return self.backend == "triton" and self.device == "cpu"

    def to(self, *tensors):
        """The tensors on this pair's device (one tensor, or a tuple)."""
        moved = tuple(None if t is None else t.to(self.device) for t in tensors)
        return moved[0] if len(moved) == 1 else moved

    def precision(self, x: torch.Tensor, codebook: torch.Tensor) -> str:
        """The precision reference.nearest_code_slack judges this pair's search of x against codebook at (the
        backend's search_precision): "tf32x3" by default for Triton on CUDA with float32 operands (float32 or
        mixed-dtype inputs), else "ieee"."""
        return dispatch.get_backend(self.backend).search_precision(self.device, x.dtype, codebook.dtype)

    def assert_nearest(self, x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> None:
        """reference.assert_nearest at this pair's precision."""
        reference.assert_nearest(x, codebook, indices, self.precision(x, codebook))

    def assert_nearest_k(self, x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> None:
        """reference.assert_nearest_k at this pair's precision."""
        reference.assert_nearest_k(x, codebook, indices, self.precision(x, codebook))

    def require(self, *tensors, op: str | None = None) -> None:
        """Skip unless this pair's backend can run on these (device) tensors (and implements ``op``, when
        given), with the dispatcher's reasons."""
        backend = dispatch.get_backend(self.backend)
        reasons = backend.not_supported_reasons(*tensors) + (backend.op_not_supported_reasons(op) if op else [])
        if reasons:
            pytest.skip(f"backend {self.backend!r} cannot run here: {'; '.join(reasons)}")


# triton-gluon-cuda: the triton backend with the Gluon bf16 search (Hopper only; every other input there runs
# the Triton kernels, as for triton-cuda).
PAIRS = (Pair("cpu", "cpu"), Pair("triton", "cuda"), Pair("triton", "cuda", "gluon"), Pair("cuda", "cuda"),
         Pair("triton", "cpu"))
TRITON_PAIRS = tuple(p for p in PAIRS if p.backend == "triton")


def _triton_library_interpreted() -> bool:
    import triton

    return type(triton.language.zeros).__name__ == "InterpretedFunction"


def _pair_or_skip(pair: Pair) -> Pair:
    if pair.device == "cuda" and not torch.cuda.is_available():
        # No CUDA tensor can be made for the dispatcher's probe; say what the backend itself says.
        reason = dispatch.get_backend(pair.backend).unavailable_reason() or "no CUDA device visible to torch"
        pytest.skip(f"{pair} cannot run here: {reason}")
    probe = torch.empty(1, 1, device=pair.device)
    if pair.interpreted and not STARTED_INTERPRETED:
        reasons = dispatch.get_backend("triton").not_supported_reasons(probe) or [
            "TRITON_INTERPRET was set after triton was imported"]
        pytest.skip(f"backend 'triton' cannot run here: {'; '.join(reasons)} "
                    f"({INTERPRETER_RUNNER} runs the triton-cpu cases in a fresh TRITON_INTERPRET=1 process)")
    pair.require(probe)
    if pair.search_kernel == "gluon":
        import fastvq.triton

        half = probe.to(torch.bfloat16)
        reason = fastvq.triton.gluon_search_reason(half, half)
        if reason is not None:
            pytest.skip(f"{pair} cannot run here: {reason}")
    if pair.interpreted and not _triton_library_interpreted():
        pytest.fail("started with TRITON_INTERPRET=1, yet triton's library was decorated without the "
                    "interpreter (something imported triton first with the variable unset)")
    return pair


# Environment variables that would change what a pair runs: a forced backend, TF32 searches,
# deterministic reductions (tests that want those set them themselves).
MODE_VARIABLES = ("FASTVQ_BACKEND", "FASTVQ_TRITON_TF32", "FASTVQ_TRITON_FP32_PRECISION", "FASTVQ_DETERMINISTIC",
                  "FASTVQ_TRITON_SEARCH_KERNEL")


def _in_default_mode(request):
    pair = _pair_or_skip(request.param)
    with pytest.MonkeyPatch.context() as patch:
        for name in MODE_VARIABLES:
            patch.delenv(name, raising=False)
        if pair.search_kernel == "gluon":
            patch.setenv("FASTVQ_TRITON_SEARCH_KERNEL", "gluon")
        yield pair


@pytest.fixture(scope="module", params=PAIRS, ids=str)
def pair(request):
    yield from _in_default_mode(request)


@pytest.fixture(scope="module", params=TRITON_PAIRS, ids=str)
def triton_pair(request):
    yield from _in_default_mode(request)


def skip_if_slow(pair: Pair, num_rows: int, num_codes: int, dim: int) -> None:
    """Skip a case of more than INTERPRETER_TILE_BUDGET tiles on the interpreter pair."""
    tiles = -(-num_rows // 64) * -(-num_codes // 64) * -(-dim // 32)
    if pair.interpreted and tiles > INTERPRETER_TILE_BUDGET:
        pytest.skip(f"(N, K, d) = ({num_rows}, {num_codes}, {dim}) is {tiles} tiles, over the interpreter's "
                    f"budget of {INTERPRETER_TILE_BUDGET}")


def skip_on_interpreter(pair: Pair, why: str) -> None:
    """Skip a case that is not about one op's numbers (training loops, many launches) on the interpreter."""
    if pair.interpreted:
        pytest.skip(f"too slow for Triton's interpreter: {why}")


def to_cpu(*tensors):
    """Results back on the CPU (one tensor, or a tuple)."""
    moved = tuple(None if t is None else t.detach().cpu() for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def backend_or_skip(name: str, *tensors) -> str:
    reasons = dispatch.get_backend(name).not_supported_reasons(*tensors)
    if reasons:
        pytest.skip(f"backend {name!r} cannot run here: {'; '.join(reasons)}")
    return name


# ---- GPU reductions: float atomics or sorted (deterministic) sums ----------------------------
def use_reduction(monkeypatch, reduction: str) -> None:
    monkeypatch.setenv("FASTVQ_DETERMINISTIC", "1" if reduction == "deterministic" else "0")


# Reductions × dtypes for the ema_stats and quantize_backward bodies. The cpu kernels have one
# (deterministic) reduction, so the cpu pair skips the "deterministic" setting; the reduction path
# does not depend on the dtype, so under the (slow) interpreter it runs on float32 only.
REDUCTION_DTYPES = [("atomic", torch.float32), ("atomic", torch.bfloat16), ("atomic", torch.float16),
                    ("deterministic", torch.float32), ("deterministic", torch.bfloat16),
                    ("deterministic", torch.float16)]
REDUCTION_IDS = [f"{r}-{str(d).removeprefix('torch.')}" for r, d in REDUCTION_DTYPES]


def skip_reduction_if_redundant(pair: Pair, reduction: str, dtype: torch.dtype, num_codes: int = 1) -> None:
    if reduction != "deterministic":
        return
    if pair.backend == "cpu":
        pytest.skip("the cpu kernels are always deterministic: FASTVQ_DETERMINISTIC changes nothing there")
    if pair.interpreted and dtype != torch.float32:
        pytest.skip("the deterministic reduction does not depend on the dtype; the interpreter runs it on float32")
    if pair.interpreted and num_codes > 257:
        pytest.skip("the deterministic reduction runs one program per code: too slow for the interpreter at K > 257")


# ---- inputs ----------------------------------------------------------------------------------
def randn(*shape, seed, dtype=torch.float32) -> torch.Tensor:
    """Seeded standard normals, built on the CPU."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


NON_CONTIGUOUS_LAYOUTS = ("transposed", "row_step", "column_slice")


def non_contiguous_rows(pair: Pair, layout: str, num_rows: int, dim: int, generator) -> torch.Tensor:
    """Random (num_rows, dim) rows as a non-contiguous view made on the pair's device: the transpose of
    a (dim, N) tensor, every other row of a (2N, d) one, or a column slice of an (N, 2d) one."""
    base, view = {
        "transposed": (torch.randn(dim, num_rows, generator=generator), lambda t: t.t()),
        "row_step": (torch.randn(2 * num_rows, dim, generator=generator), lambda t: t[::2]),
        "column_slice": (torch.randn(num_rows, 2 * dim, generator=generator), lambda t: t[:, 5:5 + dim]),
    }[layout]
    return view(pair.to(base))


def small_integers(*shape, low=-4, high=5, generator=None) -> torch.Tensor:
    """Exactly representable inputs: every distance a kernel computes is an exact integer."""
    return torch.randint(low, high, shape, generator=generator).to(torch.float32)


def exact_inputs_with_duplicate_codes(num_rows: int, num_codes: int, dim: int, seed: int):
    """(x, codebook) of small integers; when K > 2 the codebook repeats rows 0 and 1 later on
    (the later copy must never win), and every other row of x is a codebook row (distance 0)."""
    generator = torch.Generator().manual_seed(seed)
    codebook = small_integers(num_codes, dim, generator=generator)
    if num_codes > 2:
        codebook[num_codes // 2] = codebook[1]
        codebook[-1] = codebook[0]
    x = small_integers(num_rows, dim, generator=generator)
    x[::2] = codebook[torch.randint(0, num_codes, (len(x[::2]),), generator=generator)]
    return x, codebook


# ---- sqdist values (the indices are judged by fastvq.reference.assert_nearest) ---------------
def chosen_sqdist(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """float64 ‖x_i − codebook[indices_i]‖² on the CPU: the value sqdist must have for these indices."""
    x64, e64 = x.detach().cpu().double(), codebook.detach().cpu().double()
    return ((x64 - e64[indices.cpu()]) ** 2).sum(-1)


def assert_sqdist(x, codebook, indices, sqdist) -> None:
    """sqdist is float32 (N,) and the chosen code's distance, within TOLERANCES["sqdist"]."""
    assert sqdist.dtype == torch.float32 and tuple(sqdist.shape) == tuple(x.shape[:1])
    torch.testing.assert_close(sqdist.cpu().double(), chosen_sqdist(x, codebook, indices), **TOLERANCES["sqdist"])


def assert_within_summation_bound(sums, x, indices, num_codes, exact: bool = False) -> None:
    """Per-code float32 sums of the rows of x: each sum of n terms is within n·u·Σ|x_i| of the exact
    sum (the recursive summation bound, (n − 1)·u, for any order, plus the final rounding).
    ``exact``: small-integer inputs, whose float32 sums are exact."""
    want_counts, want_sums = reference.ema_stats(x.double(), indices, num_codes)
    _, abs_sums = reference.ema_stats(x.double().abs(), indices, num_codes)
    unit_roundoff = torch.finfo(torch.float32).eps / 2  # u = 2⁻²⁴
    bound = 0.0 if exact else want_counts.clamp(min=1).unsqueeze(1) * unit_roundoff * abs_sums
    excess = (sums.double() - want_sums).abs() - bound
    assert bool((excess <= 0).all()), f"a per-code sum is off by {float(excess.max()):.3g} beyond the bound"
