"""The shared body of the pytest-benchmark suites: the providers and cases of `python -m fastvq.bench`.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group
    FASTVQ_BENCH_QUICK=1 ...  FASTVQ_BENCH_SHAPES=core-1,4096x1024x64 ...  FASTVQ_BENCH_DEVICE=cuda ...
    FASTVQ_BENCH_ROUNDS=7 ...   (the --quick shapes; the --shapes syntax; the device; timed rounds, default 5)

Every provider is checked against fastvq.reference first (a wrong one fails its test). These time one
test after another; for providers alternated run by run, ratios and memory, use python -m fastvq.bench.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastvq.bench import providers
from fastvq.bench.cases import make_data, select_cases
from fastvq.bench.judge import check_rows, oracle
from fastvq.bench.run import Result, prepare

ROUNDS, QUICK = int(os.environ.get("FASTVQ_BENCH_ROUNDS", "5")), os.environ.get("FASTVQ_BENCH_QUICK") == "1"
SHAPES = os.environ.get("FASTVQ_BENCH_SHAPES") or (None if QUICK else "core-1,core-2,core-3")


def parametrize_workload(workload: str):
    """Decorator: one test per (case, provider) of ``workload``."""
    cases = select_cases(QUICK, SHAPES, (workload,), os.environ.get("FASTVQ_BENCH_DEVICE", "cpu"))
    names = [p.name for p in providers.select(None)[workload]]
    ids = [f"{c.label}-{c.shape}-{c.device}".replace(f"{c.shape}-{c.shape}", c.shape) for c in cases]
    by_case = pytest.mark.parametrize("case", cases, ids=ids)
    return lambda test: by_case(pytest.mark.parametrize("provider", names)(test))


def benchmark_provider(benchmark, workload: str, case, name: str) -> None:
    provider, data, rows = providers.find(workload, name), make_data(case), check_rows(case.n, case.k, case.d)
    result = Result(case, name, provider.role, provider.description)
    best = oracle(data.x, data.codebook, rows) if workload != "kmeans" else None
    if (prepared := prepare(provider, case, data, rows, best, result)) is None:
        why = f"{name} on {case.shape}: {result.status}: {result.reason}"
        if result.status == "absent":
            pytest.skip(why)
        pytest.fail(why)
    run = prepared[0]
    benchmark.group = f"{workload} {case.label} {case.shape} {case.device}"
    benchmark.pedantic((lambda: (run(), torch.cuda.synchronize())) if case.device.startswith("cuda") else run,
                       rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["gflops_at_median"] = case.flops / benchmark.stats.stats.median / 1e9
