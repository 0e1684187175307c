"""pytest-benchmark: k-means (Lloyd, the same iterations); see suite.py."""
from suite import benchmark_provider, parametrize_workload


@parametrize_workload("kmeans")
def test_kmeans(benchmark, case, provider):
    benchmark_provider(benchmark, "kmeans", case, provider)
