"""The shared body of the pytest-benchmark suites: the providers and cases of `python -m fastvq.bench`,
each checked against fastvq.reference first (a wrong one fails its test), then timed test after test
(for runs alternated between providers, ratios and memory, use python -m fastvq.bench).

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group
    FASTVQ_BENCH_QUICK=1, FASTVQ_BENCH_SHAPES=core-1,4096x1024x64, FASTVQ_BENCH_DEVICE=cuda, FASTVQ_BENCH_ROUNDS=7:
    the --quick shapes, the --shapes syntax, the device, timed rounds (default 5)
"""
import os

import pytest
import torch

from fastvq.bench import providers
from fastvq.bench.cases import make_data, select_cases
from fastvq.bench.judge import check_rows
from fastvq.bench.run import Result, prepare

ROUNDS, QUICK = int(os.environ.get("FASTVQ_BENCH_ROUNDS", "5")), os.environ.get("FASTVQ_BENCH_QUICK") == "1"
SHAPES = os.environ.get("FASTVQ_BENCH_SHAPES") or (None if QUICK else "core-1,core-2,core-3")


def benchmark_test(workload: str):
    """A test of ``workload``, one per (case, provider)."""
    cases = select_cases(QUICK, SHAPES, (workload,), os.environ.get("FASTVQ_BENCH_DEVICE", "cpu"))
    ids = [f"{c.label}-{c.shape}-{c.device}".replace(f"{c.shape}-{c.shape}", c.shape) for c in cases]

    @pytest.mark.parametrize("case", cases, ids=ids)
    @pytest.mark.parametrize("name", [p.name for p in providers.select(None)[workload]])
    def test(benchmark, case, name):
        provider, data = providers.REGISTRY[workload, name], make_data(case)
        result = Result(case, name, provider.role, provider.description)
        if (prepared := prepare(provider, case, data, *check_rows(case, data), result)) is None:
            why = f"{name} on {case.shape}: {result.status}: {result.reason}"
            (pytest.skip if result.status == "absent" else pytest.fail)(why)
        run = prepared[0]
        benchmark.group = f"{workload} {case.label} {case.shape} {case.device}"
        benchmark.pedantic((lambda: (run(), torch.cuda.synchronize())) if case.device.startswith("cuda") else run,
                           rounds=ROUNDS, warmup_rounds=1, iterations=1)
        benchmark.extra_info["gflops_at_median"] = case.flops / benchmark.stats.stats.median / 1e9
    return test
