"""pytest-benchmark: one training step (forward + backward + EMA update); see suite.py."""
from suite import benchmark_provider, parametrize_workload


@parametrize_workload("train")
def test_training_step(benchmark, case, provider):
    benchmark_provider(benchmark, "train", case, provider)
