"""pytest-benchmark: k-means (Lloyd, the same iterations); see benchmarks/suite.py."""
from suite import benchmark_provider, parametrize_workload

WORKLOAD = "kmeans"


@parametrize_workload(WORKLOAD)
def test_kmeans(benchmark, case, provider):
    benchmark_provider(benchmark, WORKLOAD, case, provider)
