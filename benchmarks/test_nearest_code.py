"""pytest-benchmark: search forward (nearest_code + gather); see benchmarks/suite.py."""
from suite import benchmark_provider, parametrize_workload

WORKLOAD = "search"


@parametrize_workload(WORKLOAD)
def test_nearest_code(benchmark, case, provider):
    benchmark_provider(benchmark, WORKLOAD, case, provider)
