"""AVAR pipeline library: seeds, teacher stages, attention lens, VAS, filter, publish.

Pure Python stages; no Prefect imports here (orchestration lives in ``flows/``).
"""

__version__ = "0.1.0"
