"""Other projects' kernels run under kda-serving's op contract, as baselines for the benchmarks."""
