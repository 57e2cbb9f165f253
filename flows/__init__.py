"""Prefect orchestration of the pipeline: the ``synth`` flow and its ``avar`` deployment."""

import os

# Prefect's server analytics would try to reach the internet; keep them off unless asked for.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary server of local runs needs more than Prefect's default 20 s on a busy machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
