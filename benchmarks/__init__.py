"""pytest-benchmark speed benchmarks (run: python -m pytest benchmarks --benchmark-enable)."""
