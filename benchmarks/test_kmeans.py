from suite import benchmark_test

test_kmeans = benchmark_test("kmeans")
