"""Benchmarks (scripts that report, never tests): `make bench` writes BENCHMARKS.md."""
