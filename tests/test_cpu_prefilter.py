"""nearest_code's int8 prefilter on the cpu backend (csrc/cpu/nearest_code_prefilter.cpp): exact, so every
test compares it bitwise with the float32 search on the same inputs (and with fastvq.reference where the
inputs make the answer exact), and checks through prefilter_stats that the prefilter really answered.

Every test body runs once per scan kernel the machine has: AVX2 (prefilter_avx2.cpp) wherever the CPU has
AVX2 and FMA, AVX-512 VNNI and AMX-INT8 where it has those. On a CPU with none these tests skip, and the
float32 search they compare against is tested everywhere by test_cpu_extension.py and test_nearest_code.py.
"""
from __future__ import annotations

import pytest
import torch

from fastvq import _cpu
from fastvq import reference

from test_cpu_extension import SHAPES, run_nearest_code, small_int_inputs


def _available(kernel):
    try:
        _cpu.set_prefilter_kernel(kernel)
        return True
    except ValueError:
        return False
    finally:
        _cpu.set_prefilter_kernel("auto")


# The scan kernels here: AVX2 (at SIMD level avx2, or asked for at avx512), AVX-512 VNNI, AMX-INT8 tiles.
KERNELS = [kernel for kernel in ("avx2", "vnni", "amx") if _available(kernel)]
NO_INT8_SCAN = not KERNELS
pytestmark = pytest.mark.skipif(NO_INT8_SCAN, reason="this CPU or build has no AVX2 or AVX-512 VNNI: no int8 scan")


@pytest.fixture
def prefilter_mode():
    """Restores the default mode, kernel and SIMD level after a test that changes them."""
    yield _cpu.set_prefilter
    _cpu.set_prefilter("auto")
    _cpu.set_prefilter_kernel("auto")
    _cpu.set_simd_level("auto")


@pytest.fixture(params=KERNELS)
def kernel(request, prefilter_mode):
    _cpu.set_prefilter_kernel(request.param)
    yield request.param


def both_ways(x, e, threads, set_mode):
    """(float32 search outputs, prefilter outputs, prefilter_stats delta) on the same inputs."""
    set_mode("off")
    full = run_nearest_code(x, e, threads)
    set_mode("always")
    before = _cpu.prefilter_stats()
    filtered = run_nearest_code(x, e, threads)
    after = _cpu.prefilter_stats()
    return full, filtered, {key: after[key] - before[key] for key in after}


def assert_same(full, filtered):
    """Bitwise equal (a NaN distance, for a row with a non-finite entry, equals NaN)."""
    for name, a, b in zip(("indices", "sqdist", "quantized"), full, filtered):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("n,k,d", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_bitwise_the_float32_search_on_random_inputs(n, k, d, threads, prefilter_mode, kernel):
    g = torch.Generator().manual_seed(n + 3 * k + 7 * d)
    x, e = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    full, filtered, stats = both_ways(x, e, threads, prefilter_mode)
    assert_same(full, filtered)
    assert stats["calls"] == (1 if n > 0 else 0)
    assert stats["declined"] == 0 and stats["rows_in_full"] == 0
    if n > 0:  # candidates are a few per row, not the codebook
        assert 1 <= stats["codes_kept"] / n <= 64


@pytest.mark.parametrize("n", [9, 15, 17, 31, 48])
@pytest.mark.parametrize("threads", [1, 2])
def test_bitwise_for_row_counts_that_end_in_either_block_of_a_scan_pass(n, threads, prefilter_mode, kernel):
    """A scan pass takes up to PrefilterKernels::scan_rows rows (VNNI: 16, two interleaved blocks of 8, its
    warm-up a block at a time): counts that end inside the second block, at it, and past it; K = 2100 gives
    a warm-up (64 panels) and panels after it."""
    g = torch.Generator().manual_seed(40 + n)
    x, e = torch.randn(n, 40, generator=g), torch.randn(2100, 40, generator=g)
    full, filtered, stats = both_ways(x, e, threads, prefilter_mode)
    assert_same(full, filtered)
    assert stats["calls"] == 1 and stats["declined"] == 0 and stats["rows_in_full"] == 0


@pytest.mark.parametrize("n,k,d", [(16, 1030, 64), (3, 20000, 5), (1000, 1030, 33), (7, 257, 130), (1, 1, 1)])
def test_exact_inputs_match_the_reference_with_ties_to_the_lowest_index(n, k, d, prefilter_mode, kernel):
    x, e = small_int_inputs(n, k, d, seed=5 * n + k + d)
    want_idx, want_sq = reference.nearest_code(x.double(), e.double())
    prefilter_mode("always")
    idx, sq, q = run_nearest_code(x, e, 2)
    assert torch.equal(idx, want_idx)
    assert torch.equal(sq, want_sq.float())
    assert torch.equal(q, e[idx])


def test_near_ties_below_the_int8_resolution_keep_the_float32_answer(prefilter_mode, kernel):
    # 64 copies of each of 64 codes, each copy moved by ~1e-4 of its size: every copy quantizes alike, so
    # the int8 scores cannot order them; only the bound lets all of them through to the float32 score.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=g)
    e = (base.repeat_interleave(64, 0) * (1 + 1e-4 * torch.randn(4096, 48, generator=g))).contiguous()
    x = (base[torch.randint(0, 64, (300,), generator=g)] + 1e-3 * torch.randn(300, 48, generator=g)).contiguous()
    full, filtered, stats = both_ways(x, e, 2, prefilter_mode)
    assert_same(full, filtered)
    assert stats["calls"] == 1
    assert stats["codes_kept"] >= 300 * 8  # the near-duplicates of each row's code passed


def int8_errors_against_the_row():
    """A row and two codes at the edge of the bound: x = 127 everywhere (exact int8, scale 1) and codes whose
    packed values -2e sit just inside half a level from their int8 level (scale 2): each of B's 63 errors
    is +0.496 of a level, each of A's -0.496, all along x. A is nearer (float32 and exactly), yet its int8 score is
    above B's by 0.98 of R(A) + R(B), the sum of their bounds. The codebook is symmetric, so its centre is 0."""
    level = 0.5 - 2.0**-8
    packed_a = torch.full((64,), 2 * (-126 - level))  # -2e, level -126, error -0.99 (scale 2)
    packed_b = torch.full((64,), 2 * (-126 + level))
    packed_a[0] = packed_b[0] = -254.0  # the largest entry sets the scale: 254 / 127 = 2, level -127 exactly
    codes = torch.stack([packed_b, packed_a]) / -2
    e = torch.cat([codes, -codes]).contiguous()  # B, A, -B, -A
    x = torch.full((1, 64), 127.0)
    return x, e


def test_a_code_whose_int8_score_is_off_by_nearly_the_whole_bound_is_still_found(prefilter_mode, kernel):
    x, e = int8_errors_against_the_row()
    exact = ((x.double() - e.double()) ** 2).sum(1)
    assert int(exact.argmin()) == 1  # A
    packed = -2 * e[:2].double()
    quantized = 2.0 * torch.round(packed / 2.0)
    approximate = (e[:2].double() ** 2).sum(1) + (x.double() * quantized).sum(1)  # S~ = ||e||^2 + x . e^
    radius = x.double().norm() * (packed - quantized).norm(dim=1)  # R = ||x|| ||-2e - e^|| (x is exact: beta = 0)
    assert float(approximate[0]) < float(approximate[1])  # int8 ranks B first
    assert float(approximate[1] - approximate[0]) > 0.97 * float(radius.sum())  # the bound is nearly tight
    full, filtered, stats = both_ways(x, e, 1, prefilter_mode)
    assert_same(full, filtered)
    assert int(filtered[0][0]) == 1 and stats["calls"] == 1 and stats["rows_in_full"] == 0


def test_rows_and_codes_at_the_ends_of_their_int8_ranges(prefilter_mode, kernel):
    # Sign patterns: every level of x is +-max_level and every code byte 1 or 255, the products' largest sums
    # (the AVX2 scan's vpmaddubsw adds two byte products in int16: levels of +-127 there would saturate it).
    g = torch.Generator().manual_seed(12)

    def signs(rows):
        return torch.randint(0, 2, (rows, 64), generator=g).float() * 2 - 1

    e = 2.0 * signs(2048)
    x = torch.cat([3.0 * signs(60), 1.5 * e[:4]]).contiguous()  # rows near codes 0-3 too
    full, filtered, stats = both_ways(x, e, 2, prefilter_mode)
    assert_same(full, filtered)
    assert torch.equal(filtered[0][60:], torch.arange(4))
    assert stats["calls"] == 1 and stats["rows_in_full"] == 0


def test_rows_whose_candidates_overflow_are_searched_in_full(prefilter_mode, kernel):
    # A constant codebook: every code ties, every code is a candidate, far past the per-row cap.
    e = torch.full((5000, 40), 0.5)
    x = torch.randn(20, 40, generator=torch.Generator().manual_seed(1))
    full, filtered, stats = both_ways(x, e, 2, prefilter_mode)
    assert_same(full, filtered)
    assert torch.equal(filtered[0], torch.zeros(20, dtype=torch.int64))
    assert stats["rows_in_full"] == 20


def test_non_finite_codes_never_win_and_non_finite_rows_decline(prefilter_mode, kernel):
    g = torch.Generator().manual_seed(2)
    x, e = torch.randn(50, 36, generator=g), torch.randn(3000, 36, generator=g)
    e[::7, 3] = float("nan")
    e[1::11, 0] = float("inf")
    full, filtered, stats = both_ways(x, e, 2, prefilter_mode)
    assert_same(full, filtered)
    assert stats["calls"] == 1 and stats["declined"] == 0
    x[4, 2] = float("inf")
    full, filtered, stats = both_ways(x, e, 2, prefilter_mode)
    assert_same(full, filtered)
    assert stats["calls"] == 0 and stats["declined"] == 1


@pytest.mark.parametrize("bad_row", [0, 1500, 2999])
def test_a_bad_row_among_many_makes_the_whole_call_the_full_search(bad_row, prefilter_mode, kernel):
    # Enough rows that the prefilter quantizes them item by item, while other items are already answered:
    # those answers are rewritten by the full search, and nothing of the call reaches the stats.
    g = torch.Generator().manual_seed(6)
    x, e = torch.randn(3000, 64, generator=g), torch.randn(2048, 64, generator=g)
    x[bad_row, 5] = float("nan")
    full, filtered, stats = both_ways(x, e, 2, prefilter_mode)
    assert_same(full, filtered)
    counted = ("calls", "declined", "codes_kept", "candidates", "rows_in_full")
    assert {key: stats[key] for key in counted} == dict(zip(counted, (0, 1, 0, 0, 0)))
    assert int(filtered[0][bad_row]) == 0  # the full search's rule for a non-finite row


def test_non_contiguous_and_offset_codebook_views(prefilter_mode, kernel):
    g = torch.Generator().manual_seed(4)
    big = torch.randn(6000, 80, generator=g)
    e = big[100:5100, 10:74].contiguous()  # the binding takes C-contiguous arrays: the backend copies views
    x = torch.randn(33, 64, generator=g) * 3 + 100.0  # far from the origin: the search's centred frame
    full, filtered, stats = both_ways(x, e, 2, prefilter_mode)
    assert_same(full, filtered)
    assert stats["calls"] == 1


def test_a_row_out_of_range_raises_as_the_float32_search_does(prefilter_mode):
    x = torch.randn(5, 64)
    x[3] = 1e19
    e = torch.randn(4096, 64)
    prefilter_mode("always")
    with pytest.raises(ValueError, match="x row 3 is too far from the search centre"):
        run_nearest_code(x, e, 1)


def test_the_vnni_and_amx_scans_keep_the_same_candidates(prefilter_mode):
    if not {"vnni", "amx"} <= set(KERNELS):
        pytest.skip("no AMX-INT8 here: one scan kernel reads the VNNI rows")
    g = torch.Generator().manual_seed(9)
    x, e = torch.randn(77, 100, generator=g), torch.randn(5000, 100, generator=g)  # d: two 64-dim chunks, a tail
    prefilter_mode("always")
    listed = {}
    for name in ("vnni", "amx"):
        _cpu.set_prefilter_kernel(name)
        before = _cpu.prefilter_stats()
        run_nearest_code(x, e, 2)
        after = _cpu.prefilter_stats()
        listed[name] = (after["candidates"] - before["candidates"], after["codes_kept"] - before["codes_kept"])
    # The lists differ (the AMX scan lowers its threshold after two panels, the VNNI scan after one); what is
    # kept of them is the same set, every code whose lower bound is within the smallest upper bound over all codes.
    # (The AVX2 scan quantizes its rows more coarsely: its bound, and so what it keeps, differs.)
    assert listed["vnni"][1] == listed["amx"][1] >= 77
    assert listed["vnni"][0] >= listed["vnni"][1] and listed["amx"][0] >= listed["amx"][1]


def test_kernel_choice_and_its_errors(prefilter_mode):
    # "auto": the VNNI family at SIMD level avx512 where the CPU has VNNI, AVX2 at level avx2, none at avx512
    # without VNNI (there the AVX2 scan runs only when asked for).
    level = _cpu.simd_level()
    auto = "amx" if "amx" in KERNELS else "vnni" if "vnni" in KERNELS else "avx2" if level == "avx2" else ""
    assert _cpu.prefilter_kernel() == auto
    if level == "avx512" and "vnni" not in KERNELS:
        assert "runs only when asked for (set_prefilter_kernel('avx2'))" in _cpu.prefilter_reason(16, 65536, 64)
    for name in ("avx2", "vnni", "amx"):
        if name in KERNELS:
            _cpu.set_prefilter_kernel(name)
            assert _cpu.prefilter_kernel() == name
        else:
            with pytest.raises(ValueError, match=f"kernel '{name}' is not available here"):
                _cpu.set_prefilter_kernel(name)
    with pytest.raises(ValueError, match="kernel must be one of 'auto', 'vnni', 'amx', 'avx2', got 'tpu'"):
        _cpu.set_prefilter_kernel("tpu")
    _cpu.set_prefilter_kernel("auto")
    if "vnni" in KERNELS:  # the SIMD level caps the ISA: at avx2 the AVX2 scan, whatever was asked for
        _cpu.set_prefilter_kernel("vnni")
        _cpu.set_simd_level("avx2")
        assert _cpu.prefilter_kernel() == "avx2"
    _cpu.set_simd_level("portable")
    assert _cpu.prefilter_kernel() == ""
    assert _cpu.prefilter_reason(16, 65536, 64) == "the SIMD level is 'portable': no int8 scan"
    x, e = torch.randn(40, 64), torch.randn(4096, 64)
    before = _cpu.prefilter_stats()["calls"]
    run_nearest_code(x, e, 1)
    assert _cpu.prefilter_stats()["calls"] == before  # the portable level searches without it


def test_int8_product_ratio_is_measured_where_the_vnni_scan_runs():
    ratio = _cpu.int8_product_ratio()
    if "vnni" in KERNELS:  # a 512-bit vpdpbusd does 4x an FMA's multiply-adds, issued at half to full its rate
        assert 1.5 <= ratio <= 6.0, ratio
    else:
        assert ratio == 0.0


def test_mode_and_reasons_with_the_vnni_family(prefilter_mode):
    if "vnni" not in KERNELS:
        pytest.skip("no AVX-512 VNNI here")
    # Where int8 products run >= 3x as fast as fp32 ones (4.0 on a Zen 5), the VNNI scan pays from K d = 2^16
    # and K >= 512 (below 64 rows too); elsewhere from K d = 2^17 and K >= 1024 (2^18 below 16 rows either way).
    wide = _cpu.int8_product_ratio() >= 3.0
    assert _cpu.prefilter_mode() == "auto"
    assert _cpu.prefilter_reason(16, 65536, 64) == ""
    assert _cpu.prefilter_reason(32768, 2048, 64) == ""
    assert "K = 512, K d = 16384: too few codes" in _cpu.prefilter_reason(32768, 512, 32)
    assert "d = 16 < 24" in _cpu.prefilter_reason(16, 65536, 16)
    # The AMX scan needs K >= 256 and K d >= 2^16 from d = 32, 2^15 from d = 48.
    for kernel in ("vnni", "amx"):
        if kernel not in KERNELS:
            continue
        _cpu.set_prefilter_kernel(kernel)
        for k, d in [(1024, 64), (512, 256), (2048, 32), (512, 64)]:
            reason = _cpu.prefilter_reason(32768, k, d)
            if kernel == "amx" or (wide and k * d >= 2**16):
                assert reason == "", (kernel, k, d)
            else:
                assert f"K = {k}, K d = {k * d}: too few codes" in reason, (kernel, k, d)
        assert "K = 128, K d = 65536: too few codes" in _cpu.prefilter_reason(32768, 128, 512)
        assert "K = 256, K d = 16384: too few codes" in _cpu.prefilter_reason(32768, 256, 64)
        assert "K = 1024, K d = 32768: too few codes" in _cpu.prefilter_reason(32768, 1024, 32)
        assert "K = 2048, K d = 49152: too few codes" in _cpu.prefilter_reason(32768, 2048, 24)
    _cpu.set_prefilter_kernel("vnni")
    reason = _cpu.prefilter_reason(32768, 256, 256)
    assert f"K = 256, K d = 65536: too few codes to pay back (auto needs K >= {512 if wide else 1024}" in reason
    _cpu.set_prefilter_kernel("auto")
    # Fewer rows need more codes: K d >= 2^18 below 16 rows, 2^17 below 64 (2^16 where int8 runs wide).
    assert _cpu.prefilter_reason(15, 4096, 64) == _cpu.prefilter_reason(16, 2048, 64) == ""
    reason = _cpu.prefilter_reason(64, 1024, 64)
    assert reason == "" if "amx" in KERNELS or wide else "K = 1024, K d = 65536: too few codes" in reason
    assert "n = 15 rows, K d = 131072: too few codes for so few rows" in _cpu.prefilter_reason(15, 2048, 64)
    assert "n = 1 rows, K d = 131072: too few" in _cpu.prefilter_reason(1, 4096, 32)
    # 63 rows, K d = 2^16: enough codes for the AMX scan but too few for so few rows; the VNNI scan's K d floor
    reason = _cpu.prefilter_reason(63, 2048, 32)
    if wide:
        assert reason == ""
    elif "amx" in KERNELS:
        assert "n = 63 rows, K d = 65536: too few" in reason
    else:
        assert "K = 2048, K d = 65536: too few codes" in reason


def test_mode_and_reasons_with_the_avx2_scan(prefilter_mode):
    if "avx2" not in KERNELS:
        pytest.skip("no AVX2 here")
    _cpu.set_prefilter_kernel("avx2")
    # d >= 24, K >= 1024 and K d >= 2^16; K d >= 2^17 below 16 rows.
    for n, k, d in [(32768, 1024, 64), (32768, 2048, 32), (64, 1024, 64), (16, 1024, 64), (15, 2048, 64),
                    (1, 4096, 32)]:
        assert _cpu.prefilter_reason(n, k, d) == "", (n, k, d)
    assert "d = 16 < 24" in _cpu.prefilter_reason(16, 65536, 16)
    reason = _cpu.prefilter_reason(32768, 512, 64)
    assert reason == "K = 512, K d = 32768: too few codes to pay back (auto needs K >= 1024 and K d >= 65536)"
    assert "K = 1024, K d = 32768: too few codes" in _cpu.prefilter_reason(32768, 1024, 32)
    assert "K = 2048, K d = 49152: too few codes" in _cpu.prefilter_reason(32768, 2048, 24)
    assert "n = 15 rows, K d = 65536: too few codes for so few rows" in _cpu.prefilter_reason(15, 1024, 64)


def test_mode_switches_and_their_errors(prefilter_mode):
    assert _cpu.prefilter_mode() == "auto"
    assert "d = 1025 > 1024" in _cpu.prefilter_reason(16, 65536, 1025)
    prefilter_mode("always")
    assert _cpu.prefilter_mode() == "always"
    assert _cpu.prefilter_reason(32768, 1024, 8) == ""
    assert _cpu.prefilter_reason(0, 1024, 8) == "no rows"
    prefilter_mode("off")
    assert "off" in _cpu.prefilter_reason(16, 65536, 64)
    with pytest.raises(ValueError, match="mode must be one of 'auto', 'always', 'off', got 'sometimes'"):
        _cpu.set_prefilter("sometimes")
    assert _cpu.prefilter_mode() == "off"


def test_the_int8_copy_is_cached_with_its_pack_and_counted(prefilter_mode):
    _cpu.empty_cache()
    g = torch.Generator().manual_seed(6)
    x, e = torch.randn(4, 64, generator=g), torch.randn(8192, 64, generator=g)
    key = [1234, 5678]
    prefilter_mode("off")
    idx = torch.empty(4, dtype=torch.int64)
    sq = torch.empty(4)
    _cpu.nearest_code(x, e, idx, sq, None, 1, cache_key=key)
    pack_only = _cpu.pack_cache_bytes()
    prefilter_mode("always")
    _cpu.nearest_code(x, e, idx, sq, None, 1, cache_key=key)
    with_copy = _cpu.pack_cache_bytes()
    # the int8 codes (K d bytes) and a scale and a norm per code
    assert with_copy - pack_only >= 8192 * 64 + 2 * 8192 * 4
    _cpu.nearest_code(x, e, idx, sq, None, 1, cache_key=key)
    assert _cpu.pack_cache_bytes() == with_copy  # reused, not rebuilt
    assert _cpu.empty_cache() == with_copy
    assert _cpu.pack_cache_bytes() == 0


@pytest.mark.parametrize("value,expected", [("off", "int8 prefilter unused: the prefilter is off"),
                                            ("always", f"int8 prefilter always ({_cpu.prefilter_kernel()} scan"
                                             + (", int8 products" if _cpu.prefilter_kernel() in ("vnni", "amx")
                                                else ")")),
                                            ("often", "$FASTVQ_CPU_PREFILTER='often': mode must be one of")])
def test_the_environment_variable_sets_the_mode_and_info_reports_it(value, expected):
    import os
    import subprocess
    import sys

    code = "from fastvq.backends.cpu import CpuBackend as B; b = B(); print(b.unavailable_reason() or b.describe())"
    env = dict(os.environ, FASTVQ_CPU_PREFILTER=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert expected in out


def test_auto_builds_the_int8_copy_only_where_it_pays_back(prefilter_mode):
    # A fresh codebook's int8 copy costs about a pass over the pack: "auto" builds it for >= 256 rows, or
    # for a pack taken from the cache (the codebook is searched again); otherwise the float32 search runs.
    _cpu.empty_cache()
    g = torch.Generator().manual_seed(8)
    e = torch.randn(8192, 64, generator=g)
    idx, sq = torch.empty(300, dtype=torch.int64), torch.empty(300)

    def counts(n, key):
        before = _cpu.prefilter_stats()
        _cpu.nearest_code(torch.randn(n, 64, generator=g), e, idx[:n], sq[:n], None, 2, cache_key=key)
        after = _cpu.prefilter_stats()
        return after["calls"] - before["calls"], after["deferred"] - before["deferred"]

    assert counts(16, []) == (0, 1)  # fresh, few rows
    assert counts(300, []) == (1, 0)  # fresh, enough rows
    assert counts(16, [77]) == (0, 1)  # first use of a cached pack
    assert counts(16, [77]) == (1, 0)  # searched again: built now
    assert counts(16, [77]) == (1, 0)  # and kept
    prefilter_mode("always")
    assert counts(16, []) == (1, 0)


def run_with_hint(x, e, hint, threads=2):
    idx, sq, q = torch.full((x.shape[0],), -7), torch.full((x.shape[0],), -7.0), torch.full(x.shape, -7.0)
    _cpu.nearest_code(x, e, idx, sq, q, threads, hint=hint)
    return idx, sq, q


@pytest.mark.parametrize("n,k,d", [(0, 3, 33), (1, 1030, 64), (3, 257, 33), (33, 20000, 5), (257, 1030, 48),
                                   (1030, 2048, 64)])
def test_any_hint_gives_the_float32_search_outputs(n, k, d, prefilter_mode, kernel):
    # The hint only starts each row's running minimum of S~ (at one code's S~), so whatever it names, even
    # a code that can never win or one outside [0, K) (the binding does not check; the kernel ignores it).
    g = torch.Generator().manual_seed(n + k + d)
    x, e = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    e[k // 2, 0] = float("nan")
    prefilter_mode("off")
    full = run_nearest_code(x, e, 2)
    prefilter_mode("always")
    hints = {"the answer": full[0], "the farthest": (k - 1) - full[0], "zeros": torch.zeros(n, dtype=torch.int64),
             "random": torch.randint(0, k, (n,), generator=g), "a NaN code": torch.full((n,), k // 2),
             "out of range": torch.arange(n) % 2 * (k + 100) - 1}
    for name, hint in hints.items():
        before = _cpu.prefilter_stats()
        filtered = run_with_hint(x, e, hint)
        assert_same(full, filtered)
        assert _cpu.prefilter_stats()["calls"] - before["calls"] == (1 if n else 0), name


def test_a_good_hint_lists_fewer_codes_than_the_warm_up(prefilter_mode, kernel):
    # The last assignment as hint (k-means): the scan starts at the answer's S~ instead of the minimum of
    # its first panels (16 for VNNI and AMX, 48 for AVX2, of 256 here), and lists under half the codes
    # (AVX2: 11.2 a row without, 5.1 with). At K = 1024 the AVX2 warm-up covers 48 of 64 panels, and a hint
    # saves less (4.8 against 3.8).
    g = torch.Generator().manual_seed(8)
    x, e = torch.randn(2000, 64, generator=g), torch.randn(4096, 64, generator=g)
    prefilter_mode("off")
    answer = run_nearest_code(x, e, 2)[0]
    prefilter_mode("always")
    listed = []
    for hint in (None, answer):
        before = _cpu.prefilter_stats()
        run_with_hint(x, e, hint)
        listed.append(_cpu.prefilter_stats()["candidates"] - before["candidates"])
    assert listed[1] < 0.6 * listed[0]


def test_auto_scans_fewer_than_12_rows_with_vnni_and_more_with_amx(prefilter_mode):
    if not {"vnni", "amx"} <= set(KERNELS):
        pytest.skip("no AMX-INT8 here")
    g = torch.Generator().manual_seed(10)
    e = torch.randn(5000, 64, generator=g)
    prefilter_mode("always")
    for kernel, amx_rows in [("auto", {12, 40}), ("amx", {1, 2, 11, 12, 40}), ("vnni", set()), ("avx2", set())]:
        _cpu.set_prefilter_kernel(kernel)
        for n in (1, 2, 11, 12, 40):
            before = _cpu.prefilter_stats()
            run_nearest_code(torch.randn(n, 64, generator=g), e, 2)
            after = _cpu.prefilter_stats()
            assert after["calls"] - before["calls"] == 1
            assert after["amx_calls"] - before["amx_calls"] == (n in amx_rows), (kernel, n)
