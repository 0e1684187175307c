from suite import benchmark_test

test_nearest_code = benchmark_test("nearest_code")
