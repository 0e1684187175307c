"""pytest-benchmark: k-means (Lloyd, the same iterations), the providers of `python -m fastvq.bench`.

    pytest benchmarks/test_kmeans.py --benchmark-only --benchmark-group-by=group
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
from fastvq.bench.workloads import pytest_cases

WORKLOAD = "kmeans"
ROUNDS = int(os.environ.get("FASTVQ_BENCH_ROUNDS", "5"))
CASES = pytest_cases(WORKLOAD)
PROVIDERS = [p.name for p in select_providers(None)[WORKLOAD]]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.label}-{c.shape}" for c in CASES])
def test_kmeans(benchmark, case, provider):
    runner, why = checked_runner(WORKLOAD, provider, case)
    if runner is None:
        if why.startswith("absent"):
            pytest.skip(why)
        pytest.fail(f"{provider} on {case.shape}: {why}")
    benchmark.group = f"{WORKLOAD} {case.label} {case.shape}"
    benchmark.pedantic(runner, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["gflops_at_median"] = case.flops / benchmark.stats.stats.median / 1e9
