"""fastvq._cpu (the raw C++ binding) and CpuBackend against a tiny inline float64 oracle.

The oracle uses sums of squared differences in float64, never the expansion the kernels
use. Inputs are either small integers (every distance exact in float32, so indices must
equal torch.argmin exactly, ties to the lowest index) or random normals (judged by
distance: the chosen code may not be farther than the true nearest by more than the
float32 rounding of ||x||^2 + ||e||^2).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvq import _cpu  # a missing build fails here, loudly: `pip install -e .`
from fastvq.backends.cpu import CpuBackend

# ---- inline oracle ---------------------------------------------------------------------


def exact_sqdist(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 sums of squared differences, in row chunks to bound memory."""
    x, e = x.double(), e.double()
    rows = max(1, (1 << 22) // max(1, e.shape[0] * e.shape[1]))
    chunks = [((x[i : i + rows, None, :] - e[None]) ** 2).sum(-1) for i in range(0, x.shape[0], rows)]
    return torch.cat(chunks) if chunks else torch.empty(0, e.shape[0], dtype=torch.float64)


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


ALL_SIMD_LEVELS = ["portable", "avx2", "avx512"]
SIMD_LEVELS = ALL_SIMD_LEVELS[: ALL_SIMD_LEVELS.index(_cpu.best_simd_level()) + 1]


@pytest.fixture(params=SIMD_LEVELS)
def simd_level(request):
    _cpu.set_simd_level(request.param)
    yield request.param
    _cpu.set_simd_level("auto")


# (N, K, d): N = 0, tails of the 6-row tile and 16-code panel, d = 1 and odd, small N with
# many codes (codes split across threads when the work is big enough: 40 x 40000 x 16,
# 150 x 2100 x 130), and several K blocks (d = 130 makes blocks of ~63 panels).
SHAPES = [
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
    x, e = small_int_inputs(n, k, d, seed=n + k + d)
    dist = exact_sqdist(x, e)
    for threads in (1, 2):
        idx, sq, q = run_nearest_code(x, e, threads)
        if n:
            assert torch.equal(idx, dist.argmin(1)), f"threads={threads}"
            assert torch.equal(sq.double(), dist.min(1).values)
        assert torch.equal(q, e[idx])


@pytest.mark.parametrize("period", [1, 3, 8, 16, 17, 32])
@pytest.mark.parametrize("n,k", [(5, 1030), (600, 1030), (600, 45)])
def test_nearest_code_periodic_codebook_picks_the_first_copy(n, k, period, simd_level):
    # codebook[k] == codebook[k % period]: every distance is tied with codes `period` apart,
    # i.e. in the same lane, the other half of a panel, or another panel.
    g = torch.Generator().manual_seed(period)
    base = torch.randint(-2, 3, (period, 6), generator=g).float()
    e = base[torch.arange(k) % period]
    x = torch.randint(-2, 3, (n, 6), generator=g).float()
    expected = exact_sqdist(x, e).argmin(1)
    assert (expected < period).all()
    for threads in (1, 2):
        idx, _, _ = run_nearest_code(x, e, threads)
        assert torch.equal(idx, expected), f"threads={threads}"


@pytest.mark.parametrize("n,k,d", SHAPES)
def test_nearest_code_random_by_distance(n, k, d):
    g = torch.Generator().manual_seed(1000 + n + k + d)
    x, e = torch.randn(n, d, generator=g), 3 * torch.randn(k, d, generator=g)
    idx, sq, q = run_nearest_code(x, e)
    dist = exact_sqdist(x, e)
    assert idx.dtype == torch.int64 and ((idx >= 0) & (idx < k)).all()
    if n == 0:
        return
    chosen = dist.gather(1, idx[:, None])[:, 0]
    scale = x.double().pow(2).sum(1) + e.double().pow(2).sum(1).max()
    assert (chosen - dist.min(1).values <= 1e-6 * scale).all()
    torch.testing.assert_close(sq.double(), chosen, rtol=1e-5, atol=1e-6)
    assert (sq >= 0).all()
    assert torch.equal(q, e[idx])


def test_nearest_code_codebook_rows_come_back_exactly():
    g = torch.Generator().manual_seed(3)
    e = torch.randn(300, 24, generator=g)
    rows = torch.randint(0, 300, (500,), generator=g)
    idx, sq, q = run_nearest_code(e[rows], e)
    assert torch.equal(idx, rows)
    assert torch.equal(sq, torch.zeros(500))
    assert torch.equal(q, e[rows])


@pytest.mark.parametrize("n,k,d", [(1000, 1030, 33), (40, 40000, 16), (150, 2100, 130), (4099, 257, 3)])
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
    want = exact_sqdist(x[10:], e).argmin(1)
    out = torch.full((200,), -1, dtype=torch.int64)
    sq = torch.empty(100)
    _cpu.nearest_code(x[10:], e[0:], out[100:150], sq[50:])
    assert torch.equal(out[100:150], want)
    assert (out[:100] == -1).all() and (out[150:] == -1).all()


def test_nearest_code_non_finite_values():
    # Matches fastvq.reference: a NaN/inf distance counts as +inf.
    e = torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0], [5.0, 5.0], [1.0, 1.0]])
    x = torch.tensor([[1.0, 1.0], [float("nan"), 0.0], [0.0, 0.0]])
    idx, sq, q = run_nearest_code(x, e)
    assert idx.tolist() == [3, 0, 3]
    assert sq[0] == 0 and torch.isnan(sq[1]) and sq[2] == 2
    assert torch.equal(q[0], e[3]) and torch.equal(q[2], e[3])


# ---- ema_stats -------------------------------------------------------------------------


def run_ema_stats(x, idx, k, num_threads=0):
    counts, sums = torch.full((k,), -7.0), torch.full((k, x.shape[1]), -7.0)
    _cpu.ema_stats(x, idx, counts, sums, num_threads)
    return counts, sums


@pytest.mark.parametrize("n,k,d", [(0, 5, 3), (1, 1, 1), (4099, 257, 33), (1000, 3, 130), (7, 1030, 8)])
def test_ema_stats_matches_bincount_and_index_add(n, k, d):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, d, generator=g)
    # skewed code usage, and codes that no row uses
    idx = (torch.rand(n, generator=g) ** 3 * k).long().clamp_(max=k - 1)
    counts, sums = run_ema_stats(x, idx, k)
    assert torch.equal(counts.double(), torch.bincount(idx, minlength=k).double())
    expected = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx, x.double())
    torch.testing.assert_close(sums.double(), expected, rtol=1e-6, atol=1e-6)
    for threads in (1, 2, 3):
        c2, s2 = run_ema_stats(x, idx, k, threads)
        assert torch.equal(c2, counts) and torch.equal(s2, sums), f"threads={threads}"


# ---- quantize_backward -----------------------------------------------------------------


def run_backward(gq, x, e, idx, cs, ks, want_x=True, want_cb=True, num_threads=0):
    gx = torch.full_like(x, -7.0) if want_x else None
    gc = torch.full_like(e, -7.0) if want_cb else None
    _cpu.quantize_backward(gq, x, e, idx, cs, ks, gx, gc, num_threads)
    return gx, gc


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (4099, 257, 33), (1000, 1030, 7), (0, 4, 2)])
@pytest.mark.parametrize("with_grad", [True, False])
def test_quantize_backward_matches_formula(n, k, d, with_grad):
    g = torch.Generator().manual_seed(n * 3 + k)
    x, e = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    idx = torch.randint(0, k, (n,), generator=g)
    gq = torch.randn(n, d, generator=g) if with_grad else None
    cs, ks = 0.37, -1.25
    gx, gc = run_backward(gq, x, e, idx, cs, ks)
    residual = x.double() - e.double()[idx]
    expected_gx = (gq.double() if with_grad else 0) + cs * residual
    expected_gc = ks * torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx, -residual)
    torch.testing.assert_close(gx.double(), expected_gx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gc.double(), expected_gc, rtol=1e-6, atol=1e-6)
    # each output on its own, and independent of the thread count
    assert torch.equal(run_backward(gq, x, e, idx, cs, ks, want_cb=False, num_threads=1)[0], gx)
    assert torch.equal(run_backward(gq, x, e, idx, cs, ks, want_x=False, num_threads=3)[1], gc)


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


# ---- CpuBackend ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backend_nearest_code_dtypes_and_strides(dtype):
    backend = CpuBackend()
    assert backend.unavailable_reason() is None
    x, e = small_int_inputs(300, 70, 20, seed=9)
    x_strided = x.to(dtype).t().contiguous().t()  # same values, column-major
    idx, sq, q = backend.nearest_code(x_strided, e.to(dtype), want_quantized=True)
    dist = exact_sqdist(x, e)
    assert idx.dtype == torch.int64 and sq.dtype == torch.float32 and q.dtype == dtype
    assert torch.equal(idx, dist.argmin(1))  # small integers are exact in every dtype here
    assert torch.equal(q, e.to(dtype)[idx])
    assert backend.nearest_code(x.to(dtype), e.to(dtype), want_quantized=False)[2] is None


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
    residual = x.half().double() - e.double()[idx]
    torch.testing.assert_close(gx.double(), (gq.detach().double() + 0.5 * residual).half().double())
    expected_gc = 2.0 * torch.zeros(16, 8, dtype=torch.float64).index_add_(0, idx, -residual)
    torch.testing.assert_close(gc.double(), expected_gc, rtol=1e-6, atol=1e-6)
    assert backend.quantize_backward(gq, x, e, idx, torch.tensor(1.0), torch.tensor(1.0), False, True)[0] is None


def test_backend_not_supported_reasons():
    backend = CpuBackend()
    assert backend.not_supported_reasons(torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64)) == []
    reasons = backend.not_supported_reasons(torch.zeros(2, 2, dtype=torch.float64))
    assert reasons == ["dtype torch.float64: the cpu kernels compute in float32; float64 goes to the torch backend"]
    reasons = backend.not_supported_reasons(torch.zeros(2, 2, device="meta"))
    assert reasons == ["device meta: the cpu backend needs CPU tensors"]
