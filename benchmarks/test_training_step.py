from suite import benchmark_test

test_training_step = benchmark_test("train")
