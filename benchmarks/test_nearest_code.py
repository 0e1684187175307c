"""pytest-benchmark: nearest_code forward (search + gather); see suite.py."""
from suite import benchmark_provider, parametrize_workload


@parametrize_workload("nearest_code")
def test_nearest_code(benchmark, case, provider):
    benchmark_provider(benchmark, "nearest_code", case, provider)
