"""A stand-in for vLLM's package, for tests of the offline batch path (see entrypoints/launchers/run_batch.py)."""
