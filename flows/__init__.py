"""Prefect orchestration of the pipeline: the ``synth`` flow and its ``avar`` deployment."""

import os

# Prefect's server analytics would try to reach the internet; keep them off unless asked for.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
