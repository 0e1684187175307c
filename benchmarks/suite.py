"""Shared body of the pytest-benchmark suites: the providers and shapes of `python -m fastvq.bench`.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group
    FASTVQ_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only          # small shapes
    FASTVQ_BENCH_SHAPES=core-1,4096x1024x64 pytest benchmarks/ ...    # the --shapes syntax
    FASTVQ_BENCH_ROUNDS=7 ...                                         # timed rounds (default 5)

Every provider is checked against fastvq.reference before it is timed (a wrong one
fails its test). pytest-benchmark times one test after another; for providers
alternated run by run in one process, with ratios and memory, use python -m fastvq.bench.
"""
from __future__ import annotations

import os

import pytest

from fastvq.bench.providers import select_providers
from fastvq.bench.run import checked_runner
from fastvq.bench.workloads import pytest_cases as cases_of

ROUNDS = int(os.environ.get("FASTVQ_BENCH_ROUNDS", "5"))


def parametrize_workload(workload: str):
    """Decorator: one test per (case, provider) of ``workload``."""
    cases = cases_of(workload)
    providers = [p.name for p in select_providers(None)[workload]]

    def decorate(test):
        test = pytest.mark.parametrize("provider", providers)(test)
        return pytest.mark.parametrize("case", cases, ids=[f"{c.label}-{c.shape}" for c in cases])(test)

    return decorate


def benchmark_provider(benchmark, workload: str, case, provider: str) -> None:
    runner, why = checked_runner(workload, provider, case)
    if runner is None:
        if why.startswith("absent"):
            pytest.skip(why)
        pytest.fail(f"{provider} on {case.shape}: {why}")
    benchmark.group = f"{workload} {case.label} {case.shape}"
    benchmark.pedantic(runner, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["gflops_at_median"] = case.flops / benchmark.stats.stats.median / 1e9
