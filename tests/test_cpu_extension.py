"""What is specific to the raw fastvq._cpu binding and the CpuBackend wrapper around it: each SIMD
level, any thread count bitwise identical, numpy arrays and output views, float64 accumulation,
the binding's own argument errors, runtime info, and the wrapper's conversions and reasons.

Every expected value comes from fastvq.reference. Whether nearest_code, quantize and ema_stats are
right on the cpu backend is tested with the other backends' in test_nearest_code.py,
test_quantize.py and test_ema_stats.py (the cpu-cpu pair).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from fastvq import _cpu  # a missing build fails here, loudly: `pip install -e .`
from fastvq import reference
from fastvq.backends.cpu import CpuBackend

from conftest import TOLERANCES

# The cpu kernels sum in double and round once (conftest.TOLERANCES explains the row).
ACCUMULATED = TOLERANCES["float64_accumulated"]


def run_nearest_code(x, e, num_threads=0, quantized=True):
    n, d = x.shape
    idx = torch.full((n,), -7, dtype=torch.int64)
    sq = torch.full((n,), -7.0)
    q = torch.full((n, d), -7.0) if quantized else None
    _cpu.nearest_code(x, e, idx, sq, q, num_threads)
    return idx, sq, q


def small_int_inputs(n, k, d, seed):
    """Integers in [-3, 3]; codebook rows duplicated at scattered positions so ties occur."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-3, 4, (max(1, (k + 1) // 2), d), generator=g).float()
    e = base[torch.randint(0, base.shape[0], (k,), generator=g)]
    x = torch.randint(-3, 4, (n, d), generator=g).float()
    return x, e


@functools.lru_cache(maxsize=None)
def exact_case(n, k, d):
    """small_int_inputs and the reference's answer (exact: ties to the lowest index), computed
    once per shape rather than once per SIMD level."""
    x, e = small_int_inputs(n, k, d, seed=n + k + d)
    return (x, e, *reference.nearest_code(x.double(), e.double()))


ALL_SIMD_LEVELS = ["portable", "avx2", "avx512"]
SIMD_LEVELS = ALL_SIMD_LEVELS[: ALL_SIMD_LEVELS.index(_cpu.best_simd_level()) + 1]


@pytest.fixture(params=SIMD_LEVELS)
def simd_level(request):
    _cpu.set_simd_level(request.param)
    yield request.param
    _cpu.set_simd_level("auto")


# (N, K, d): N = 0, tails of the 6-row tile and 16-code panel, d = 1 and odd, small N with
# many codes (codes split across threads when the work is big enough: 40 x 40000 x 16,
# 150 x 2100 x 130), and several K blocks (d = 130 makes blocks of ~63 panels); three tiles at
# once (13-18 rows, AVX-512: search_rows18_avx512.cpp) as a whole call, split over codes, and as
# the last group of rows (113 = 96 + 17).
SHAPES = [
    (16, 1030, 64),
    (13, 20000, 5),
    (18, 40000, 16),
    (113, 257, 130),
    (0, 3, 33),
    (1, 1, 1),
    (7, 257, 130),
    (7, 1030, 64),
    (1000, 1030, 33),
    (1000, 3, 130),
    (4099, 257, 3),
    (4099, 1, 64),
    (3, 20000, 5),
    (40, 40000, 16),
    (150, 2100, 130),
]

# ---- nearest_code ----------------------------------------------------------------------


@pytest.mark.parametrize("n,k,d", SHAPES)
def test_nearest_code_exact_inputs_match_argmin(n, k, d, simd_level):
    x, e, want_idx, want_sq = exact_case(n, k, d)
    for threads in (1, 2):
        idx, sq, q = run_nearest_code(x, e, threads)
        assert torch.equal(idx, want_idx), f"threads={threads}"
        assert torch.equal(sq, want_sq)
        assert torch.equal(q, e[idx])


@pytest.mark.parametrize("period", [1, 3, 8, 16, 17, 32])
@pytest.mark.parametrize("n,k", [(5, 1030), (16, 1030), (600, 1030), (600, 45)])
def test_nearest_code_periodic_codebook_picks_the_first_copy(n, k, period, simd_level):
    # codebook[k] == codebook[k % period]: every distance is tied with codes `period` apart,
    # i.e. in the same lane, the other half of a panel, or another panel.
    g = torch.Generator().manual_seed(period)
    base = torch.randint(-2, 3, (period, 6), generator=g).float()
    e = base[torch.arange(k) % period]
    x = torch.randint(-2, 3, (n, 6), generator=g).float()
    expected, _ = reference.nearest_code(x.double(), e.double())
    assert (expected < period).all()
    for threads in (1, 2):
        idx, _, _ = run_nearest_code(x, e, threads)
        assert torch.equal(idx, expected), f"threads={threads}"


@pytest.mark.parametrize("n,k,d", [(1000, 1030, 33), (40, 40000, 16), (16, 40000, 16), (150, 2100, 130),
                                   (4099, 257, 3)])
def test_nearest_code_bitwise_identical_for_any_thread_count(n, k, d):
    g = torch.Generator().manual_seed(7)
    x, e = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    one = run_nearest_code(x, e, 1)
    for threads in (2, 3, 0):
        other = run_nearest_code(x, e, threads)
        for a, b in zip(one, other):
            assert torch.equal(a, b), f"threads={threads}"


def test_simd_levels_agree_on_exact_inputs():
    x, e = small_int_inputs(999, 1030, 37, seed=11)
    results = []
    for level in SIMD_LEVELS:
        _cpu.set_simd_level(level)
        assert _cpu.simd_level() == level
        results.append(run_nearest_code(x, e, 2))
    _cpu.set_simd_level("auto")
    assert _cpu.simd_level() == _cpu.best_simd_level()
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.skipif("avx512" not in SIMD_LEVELS, reason="three tiles at once is an AVX-512 kernel")
@pytest.mark.parametrize("n,k,d", [(16, 4099, 64), (13, 20000, 5), (113, 1030, 33)])
def test_three_tiles_at_once_give_the_tiles_bits(n, k, d):
    # search_rows18_avx512 computes each (row, code) value as the tiles do (||e||^2, then one FMA per p
    # in order) and selects the same way, so on random inputs its results are the AVX2 tiles' bit for bit.
    g = torch.Generator().manual_seed(n)
    x, e = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    results = []
    for level in ("avx2", "avx512"):
        _cpu.set_simd_level(level)
        results.append(run_nearest_code(x, e, 2))
    _cpu.set_simd_level("auto")
    for a, b in zip(*results):
        assert torch.equal(a, b)


@functools.lru_cache(maxsize=None)
def exact_topk_case(n, k, d, topk):
    x, e = small_int_inputs(n, k, d, seed=n + k + d)
    return (x, e, *reference.nearest_codes(x.double(), e.double(), topk))


@pytest.mark.parametrize("n,k,d", [(40, 300, 3), (7, 1030, 2)])
def test_nearest_codes_every_list_length_matches_the_reference(n, k, d, simd_level):
    # The SIMD kernels hold each row's list in k/16 zmm or k/8 ymm chunks, shifted across chunk
    # borders on insertion: every k up to 64 meets every chunk count, among many exact ties.
    for topk in range(1, 65):
        x, e, want_idx, want_sq = exact_topk_case(n, k, d, topk)
        idx, sq = torch.full((n, topk), -7, dtype=torch.int64), torch.full((n, topk), -7.0)
        _cpu.nearest_codes(x, e, idx, sq, 1)
        assert torch.equal(idx, want_idx), f"topk={topk}"
        assert torch.equal(sq, want_sq.float()), f"topk={topk}"


def test_nearest_code_without_quantized_and_with_numpy():
    x, e = small_int_inputs(50, 40, 9, seed=5)
    idx, sq, q = run_nearest_code(x, e, quantized=False)
    assert q is None
    xn, en = x.numpy(), e.numpy()
    idx_np, sq_np = np.empty(50, dtype=np.int64), np.empty(50, dtype=np.float32)
    _cpu.nearest_code(xn, en, idx_np, sq_np)
    assert np.array_equal(idx_np, idx.numpy()) and np.array_equal(sq_np, sq.numpy())


def test_nearest_code_views_with_storage_offsets():
    x, e = small_int_inputs(60, 40, 9, seed=6)
    want, _ = reference.nearest_code(x[10:].double(), e.double())
    out = torch.full((200,), -1, dtype=torch.int64)
    sq = torch.empty(100)
    _cpu.nearest_code(x[10:], e[0:], out[100:150], sq[50:])
    assert torch.equal(out[100:150], want)
    assert (out[:100] == -1).all() and (out[150:] == -1).all()


# ---- ema_stats -------------------------------------------------------------------------


def run_ema_stats(x, idx, k, num_threads=0):
    counts, sums = torch.full((k,), -7.0), torch.full((k, x.shape[1]), -7.0)
    _cpu.ema_stats(x, idx, counts, sums, num_threads)
    return counts, sums


@pytest.mark.parametrize("n,k,d", [(0, 5, 3), (1, 1, 1), (4099, 257, 33), (1000, 3, 130), (7, 1030, 8)])
def test_ema_stats_sums_in_double_for_any_thread_count(n, k, d):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, d, generator=g)
    # skewed code usage, and codes that no row uses
    idx = (torch.rand(n, generator=g) ** 3 * k).long().clamp_(max=k - 1)
    counts, sums = run_ema_stats(x, idx, k)
    want_counts, want_sums = reference.ema_stats(x.double(), idx, k)
    assert torch.equal(counts.double(), want_counts)
    torch.testing.assert_close(sums.double(), want_sums, **ACCUMULATED)
    for threads in (1, 2, 3):
        c2, s2 = run_ema_stats(x, idx, k, threads)
        assert torch.equal(c2, counts) and torch.equal(s2, sums), f"threads={threads}"


@pytest.mark.parametrize("n,k,d", [(20000, 1000, 64), (9000, 11, 31), (7, 1030, 8), (40000, 20000, 16), (4099, 257, 33)])
def test_ema_stats_sums_are_the_row_order_double_sums_rounded_once(n, k, d, simd_level):
    # Few codes: streamed (each thread owns a code range); many (40000 x 20000 x 16): grouped by a parallel
    # sort. Every SIMD level and thread count gives the float32 rounding of the row-order double sum, bit for bit.
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=g) * torch.logspace(-3, 3, d)  # magnitudes where the sum order shows
    idx = (torch.rand(n, generator=g) ** 3 * k).long().clamp_(max=k - 1)
    want = np.zeros((k, d))
    np.add.at(want, idx.numpy(), x.double().numpy())  # unbuffered: row order, one add at a time
    for threads in (1, 2, 3):
        counts, sums = run_ema_stats(x, idx, k, threads)
        assert torch.equal(counts, torch.bincount(idx, minlength=k).float())
        assert torch.equal(sums, torch.from_numpy(want).float()), f"threads={threads}"


# ---- quantize_backward -----------------------------------------------------------------


def run_backward(gq, x, e, idx, cs, ks, want_x=True, want_cb=True, num_threads=0):
    gx = torch.full_like(x, -7.0) if want_x else None
    gc = torch.full_like(e, -7.0) if want_cb else None
    _cpu.quantize_backward(gq, x, e, idx, cs, ks, gx, gc, num_threads)
    return gx, gc


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (4099, 257, 33), (1000, 1030, 7), (0, 4, 2)])
@pytest.mark.parametrize("with_grad", [True, False])
def test_quantize_backward_in_double_each_output_alone_any_thread_count(n, k, d, with_grad):
    g = torch.Generator().manual_seed(n * 3 + k)
    x, e = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    idx = torch.randint(0, k, (n,), generator=g)
    gq = torch.randn(n, d, generator=g) if with_grad else None
    cs, ks = 0.37, -1.25
    gx, gc = run_backward(gq, x, e, idx, cs, ks)
    expected_gx, expected_gc = reference.quantize_backward(
        gq.double() if with_grad else torch.zeros(n, d, dtype=torch.float64), x.double(), e.double(), idx,
        torch.tensor(cs, dtype=torch.float64), torch.tensor(ks, dtype=torch.float64))
    torch.testing.assert_close(gx.double(), expected_gx, **ACCUMULATED)
    torch.testing.assert_close(gc.double(), expected_gc, **ACCUMULATED)
    # each output on its own, and independent of the thread count
    assert torch.equal(run_backward(gq, x, e, idx, cs, ks, want_cb=False, num_threads=1)[0], gx)
    assert torch.equal(run_backward(gq, x, e, idx, cs, ks, want_x=False, num_threads=3)[1], gc)


def rotation_inputs(n, k, d, commit_scale, seed):
    """(grad, x, e, idx) for the rotation trick: ordinary rows; rows 1, 3, 5, ... whose upstream
    gradient g = R·(−(c/s)(x − q)), formed in float64 and rounded, nearly cancels the commitment term,
    so that grad_x is ~1e-7 of its terms and a difference in how the double sums are ordered or
    rounded shows in its float32 bits; and rows x = 0, x = q, x = −q."""
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    idx = torch.randint(0, k, (n,), generator=g)
    x[0:1], x[2:3], x[4:5] = 0.0, e[idx[2:3]], -e[idx[4:5]]
    xd, q = x.double(), e.double()[idx]
    x_norm, q_norm = xd.norm(dim=1, keepdim=True), q.norm(dim=1, keepdim=True)
    u, q_unit = xd / x_norm, q / q_norm
    w = torch.nn.functional.normalize(u + q_unit, dim=1)
    v = -commit_scale * x_norm / q_norm * (xd - q)
    cancelling = v - 2 * w * (w * v).sum(1, keepdim=True) + 2 * q_unit * (u * v).sum(1, keepdim=True)
    grad = torch.randn(n, d, generator=g)
    grad[1::2] = cancelling[1::2].float()
    return grad, x, e, idx


def run_rotation(grad, x, e, idx, commit_scale, num_threads):
    gx = torch.full_like(x, -7.0)
    _cpu.quantize_backward(grad, x, e, idx, commit_scale, 0.0, gx, None, num_threads, rotation_trick=True)
    return gx


COMMIT = 0.375  # exact in float32, as the op takes it
ROTATION_SHAPES = [(1, 1, 1), (300, 7, 3), (64, 5, 16), (1030, 257, 33), (257, 40, 130)]


@pytest.mark.parametrize("n,k,d", ROTATION_SHAPES)
def test_rotation_backward_in_double_rounded_once(n, k, d, simd_level):
    """grad_x is its float64 value rounded once: within half an ulp of the float64 reference, up to the
    double arithmetic's own error, ~1e-15 of the row's terms (float32 arithmetic, as vqp's, is off by
    ~1e-8 of them, which the rows that cancel to ~1e-7 of their terms show)."""
    grad, x, e, idx = rotation_inputs(n, k, d, COMMIT, seed=n + d)
    want, _ = reference.quantize_backward(grad.double(), x.double(), e.double(), idx,
                                          torch.tensor(COMMIT, dtype=torch.float64), torch.tensor(0.0),
                                          rotation_trick=True)
    got = run_rotation(grad, x, e, idx, COMMIT, 2).double()
    x, q = x.double(), e.double()[idx]
    s = q.norm(dim=1, keepdim=True) / x.norm(dim=1, keepdim=True).clamp_min(reference.ROTATION_EPS)
    terms = s * grad.double().norm(dim=1, keepdim=True) + COMMIT * (x - q).norm(dim=1, keepdim=True)
    excess = (got - want).abs() / (2.0**-24 * want.abs() + 1e-12 * terms)
    assert float(excess.max()) <= 1.0, f"row {int(excess.amax(1).argmax())}"


@pytest.mark.parametrize("n,k,d", ROTATION_SHAPES)
def test_rotation_backward_same_bits_at_every_simd_level_and_thread_count(n, k, d):
    args = rotation_inputs(n, k, d, COMMIT, seed=n + d)
    results = {}
    try:
        for level in SIMD_LEVELS:
            _cpu.set_simd_level(level)
            for threads in (1, 2, 3):
                results[level, threads] = run_rotation(*args, COMMIT, threads)
    finally:
        _cpu.set_simd_level("auto")
    first = results["portable", 1]
    for key, got in results.items():
        assert torch.equal(got, first), key


# ---- argument checks -------------------------------------------------------------------


def test_bad_arguments_raise_value_error_naming_the_argument():
    x, e = torch.zeros(128, 64), torch.zeros(10, 63)
    idx, sq = torch.empty(128, dtype=torch.int64), torch.empty(128)
    with pytest.raises(ValueError, match=r"^codebook must have shape \(K, d\) with d == x.shape\[1\] == 64, got \(10, 63\)$"):
        _cpu.nearest_code(x, e, idx, sq)
    e = torch.zeros(10, 64)
    cases = [
        (lambda: _cpu.nearest_code(x, e, torch.empty(128, dtype=torch.int32), sq), r"indices_out must have dtype int64, got int32"),
        (lambda: _cpu.nearest_code(x, e, idx, torch.empty(127)), r"sqdist_out must have shape \(N,\) with N == x.shape\[0\] == 128, got \(127,\)"),
        (lambda: _cpu.nearest_code(x, e, idx, sq, torch.empty(128, 65)), r"quantized_out must have shape \(N, d\)"),
        (lambda: _cpu.nearest_code(x.double(), e, idx, sq), r"x must have dtype float32, got float64"),
        (lambda: _cpu.nearest_code(torch.zeros(64, 128).t(), e, idx, sq), r"x must be C-contiguous"),
        (lambda: _cpu.nearest_code(x[0], e, idx, sq), r"x must have shape \(N, d\), got \(64,\)"),
        (lambda: _cpu.nearest_code(x, torch.zeros(0, 64), idx, sq), r"codebook must have shape \(K, d\) with K >= 1, got \(0, 64\)"),
        (lambda: _cpu.nearest_code(torch.zeros(128, 0), torch.zeros(3, 0), idx, sq), r"x must have shape \(N, d\) with d >= 1"),
        (lambda: _cpu.ema_stats(x, idx, torch.empty(10), torch.empty(10, 63)), r"sums_out must have shape \(K, d\)"),
        (lambda: _cpu.quantize_backward(torch.zeros(128, 3), x, e, idx, 1.0, 1.0), r"grad_quantized must have shape \(N, d\)"),
        (lambda: _cpu.set_simd_level("sse9"), r"level must be one of"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("bad", [-1, 10, 2**40])
def test_out_of_range_indices_raise_value_error(bad):
    x, e = torch.zeros(5, 4), torch.zeros(10, 4)
    idx = torch.tensor([0, 1, bad, 2, 3])
    expected = rf"indices must be in \[0, K\) with K == .*== 10, got indices\[2\] == {bad}$"
    with pytest.raises(ValueError, match=expected):
        _cpu.ema_stats(x, idx, torch.empty(10), torch.empty(10, 4))
    with pytest.raises(ValueError, match=expected):
        _cpu.quantize_backward(None, x, e, idx, 1.0, 1.0, torch.empty(5, 4), None)


def test_levels_this_cpu_lacks_raise_value_error():
    missing = [level for level in ALL_SIMD_LEVELS if level not in SIMD_LEVELS]
    if not missing:
        pytest.skip(f"this CPU runs every level up to {_cpu.best_simd_level()}")
    for level in missing:
        with pytest.raises(ValueError, match=f"level '{level}' is not supported here"):
            _cpu.set_simd_level(level)
    assert _cpu.simd_level() == _cpu.best_simd_level()


def test_runtime_info():
    assert isinstance(_cpu.openmp_enabled(), bool)
    assert _cpu.max_threads() >= 1
    assert _cpu.simd_level() == _cpu.best_simd_level() in ALL_SIMD_LEVELS


# ---- CpuBackend: dtype conversions, and its reasons -------------------------------------------------------------------------


def test_backend_ema_stats_and_quantize_backward():
    backend = CpuBackend()
    g = torch.Generator().manual_seed(2)
    x, e = torch.randn(200, 8, generator=g), torch.randn(16, 8, generator=g)
    idx = torch.randint(0, 16, (200,), generator=g)
    counts, sums = backend.ema_stats(x.bfloat16(), idx, 16)
    assert counts.dtype == sums.dtype == torch.float32
    assert torch.equal(counts, torch.bincount(idx, minlength=16).float())
    gq = torch.randn(200, 8, generator=g).requires_grad_()
    gx, gc = backend.quantize_backward(
        gq, x.half(), e, idx, torch.tensor(0.5), torch.tensor(2.0), need_grad_x=True, need_grad_codebook=True
    )
    assert gx.dtype == torch.float16 and gc.dtype == torch.float32
    expected_gx, expected_gc = reference.quantize_backward(
        gq.detach().double(), x.half().double(), e.double(), idx, torch.tensor(0.5), torch.tensor(2.0))
    torch.testing.assert_close(gx.double(), expected_gx.half().double())  # the same half rounding, exactly
    torch.testing.assert_close(gc.double(), expected_gc, **ACCUMULATED)
    assert backend.quantize_backward(gq, x, e, idx, torch.tensor(1.0), torch.tensor(1.0), False, True)[0] is None


def test_backend_not_supported_reasons():
    backend = CpuBackend()
    assert backend.not_supported_reasons(torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64)) == []
    reasons = backend.not_supported_reasons(torch.zeros(2, 2, dtype=torch.float64))
    assert reasons == ["dtype torch.float64: the cpu kernels compute in float32; float64 goes to the torch backend"]
    reasons = backend.not_supported_reasons(torch.zeros(2, 2, device="meta"))
    assert reasons == ["device meta: the cpu backend needs CPU tensors"]


@pytest.mark.parametrize("module", ["_cpu", "_cuda"])
def test_committed_stubs_match_the_built_extensions(module, tmp_path):
    """fastvq/_cpu.pyi and _cuda.pyi let go-to-definition follow a call into the compiled modules
    (each function's docstring names its C++ source); regenerated from the build, they must not differ."""
    import importlib.util
    import pathlib
    import subprocess
    import sys

    if importlib.util.find_spec(f"fastvq.{module}") is None:
        pytest.skip(f"fastvq.{module} is not built here")
    generated = tmp_path / f"{module}.pyi"
    subprocess.run([sys.executable, "-m", "nanobind.stubgen", "-q", "-m", f"fastvq.{module}", "-o", str(generated)],
                   check=True)
    committed = pathlib.Path(__file__).resolve().parents[1] / "fastvq" / f"{module}.pyi"
    assert committed.read_text() == generated.read_text(), (
        f"fastvq/{module}.pyi is stale: regenerate it with python -m nanobind.stubgen -m fastvq.{module} "
        f"-o fastvq/{module}.pyi")
