"""Benchmarks that back the numbers in docs/performance.md."""
