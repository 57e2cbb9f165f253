"""Test support shared by the tests and bench/: sample records, a fault-injecting OpenAI-compatible
server, lens fixtures, flow and reliability helpers, image and config helpers.

Importable as ``tests.support`` from the repository root (pytest and ``python -m bench.<name>``
both put it on the path); nothing here is part of the library.
"""
