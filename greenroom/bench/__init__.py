"""Benchmark helpers: the library code behind scripts/bench_*.py."""
