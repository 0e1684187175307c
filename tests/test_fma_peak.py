"""fastvq._cpu.fma_peak, the benchmark's yardstick (csrc/cpu/fma_peak.cpp): a sane rate at every level this CPU
runs, and its argument errors. Never a timed assertion: the bounds only say the number is a plausible rate
(a loaded machine gives less, never 0 or beyond what any CPU does per thread)."""
from __future__ import annotations

import pytest

from fastvq import _cpu

ALL_SIMD_LEVELS = ("portable", "avx2", "avx512")
SIMD_LEVELS = ALL_SIMD_LEVELS[: ALL_SIMD_LEVELS.index(_cpu.best_simd_level()) + 1]
# 2 FMA ports x 16 fp32 lanes x 2 flops at 6 GHz: no core does more.
MAX_GFLOPS_PER_THREAD = 2 * 16 * 2 * 6.0


@pytest.mark.parametrize("level", ["", *SIMD_LEVELS])
@pytest.mark.parametrize("num_threads", [1, 0])
def test_fma_peak_is_a_plausible_rate(level, num_threads):
    gflops = _cpu.fma_peak(level, num_threads, seconds=0.02)
    threads = num_threads or _cpu.max_threads()
    assert isinstance(gflops, float)
    assert 0.05 < gflops < MAX_GFLOPS_PER_THREAD * threads, (level, threads, gflops)


def test_fma_peak_argument_errors():
    with pytest.raises(ValueError, match="level must be '' .* got 'sse'"):
        _cpu.fma_peak("sse")
    for seconds in (0.0, -1.0, 61.0, float("nan")):
        with pytest.raises(ValueError, match="seconds must be in"):
            _cpu.fma_peak("", 1, seconds)
    for level in ALL_SIMD_LEVELS[len(SIMD_LEVELS):]:
        with pytest.raises(ValueError, match=f"level '{level}' is not supported here"):
            _cpu.fma_peak(level)


FLOPS_PER_ROUND = {"portable": 2 * 4 * 8, "avx2": 2 * 8 * 12, "avx512": 2 * 16 * 16}  # fma_peak.h's chains


@pytest.mark.parametrize("level", SIMD_LEVELS)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_fma_burst_reports_the_flops_it_ran(level, num_threads):
    assert _cpu.fma_burst(level, num_threads, 1000) == FLOPS_PER_ROUND[level] * 1000 * num_threads
    assert _cpu.fma_burst("", 1, 3) == FLOPS_PER_ROUND[_cpu.simd_level()] * 3


def test_fma_burst_argument_errors():
    for rounds in (0, -5, (1 << 40) + 1):
        with pytest.raises(ValueError, match=rf"rounds must be in \[1, 2\^40\], got {rounds}"):
            _cpu.fma_burst("", 1, rounds)
    with pytest.raises(ValueError, match="level must be '' .* got 'sse'"):
        _cpu.fma_burst("sse", 1, 10)
