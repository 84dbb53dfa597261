"""Benchmarks: side-by-side measurements, not tests (python -m benchmarks.<name>)."""
