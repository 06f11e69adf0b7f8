"""Benchmark helpers shared by the scripts in `scripts/bench_*.py`."""
