"""pytest-benchmark: one training step (forward + backward + EMA update); see benchmarks/suite.py."""
from suite import benchmark_provider, parametrize_workload

WORKLOAD = "train"


@parametrize_workload(WORKLOAD)
def test_training_step(benchmark, case, provider):
    benchmark_provider(benchmark, WORKLOAD, case, provider)
