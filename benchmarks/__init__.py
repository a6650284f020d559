"""jaxrobust's benchmarks against PyTorch (benchmark-only dependencies: requirements-bench.txt)."""
