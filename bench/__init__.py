"""Benchmarks: one module per performance claim, run as ``python -m bench.<name>`` from the repository root; results in BENCHMARKS.md."""
