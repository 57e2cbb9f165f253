"""Helpers for the flow tests: isolated Prefect homes, subprocess runs, process cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.synthesis.vllm_server import free_port  # noqa: F401 - re-exported for the tests

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CI_CONFIG = REPO / "configs" / "ci_small.yaml"
CI_DATASET = "avar-ci-small"  # publish.dataset_name in the small config


def flow_env(prefect_home: Path, api_url: str | None = None, extra: dict | None = None) -> dict[str, str]:
    """Environment for a flow subprocess: its own Prefect home (own SQLite), offline, no analytics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra or {})
    return env


def run_overrides(root: Path) -> list[str]:
    """Point every output of the small config under ``root``."""
    return [f"run.store_dir={root / 'store'}", f"publish.out_dir={root / 'published'}",
            f"publish.cards_dir={root / 'cards'}"]


def cli_args(overrides: list[str], config: Path = CI_CONFIG) -> list[str]:
    args = [PYTHON, "-m", "flows.synth", "--config", str(config)]
    for item in overrides:
        args += ["--set", item]
    return args


def run_cli(overrides: list[str], env: dict, timeout: float = 240, config: Path = CI_CONFIG) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli_args(overrides, config), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"flow failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def published_ids(out_dir: Path) -> list[str]:
    """All ids in the published parquet shards (every split), in file order."""
    ids: list[str] = []
    for shard in sorted((out_dir / "data").glob("*.parquet")):
        ids += pq.read_table(shard, columns=["id"]).column("id").to_pylist()
    return ids


def stage_row_ids(store: Path, stage: str) -> list[str]:
    """Every id row of a store stage (results and rejects), duplicates included."""
    ids: list[str] = []
    for shard in sorted((store / stage).rglob("part-*.parquet")):
        ids += pq.read_table(shard, columns=["id"]).column("id").to_pylist()
    return ids


def last_summary(store: Path) -> dict:
    return json.loads((store / "run_summary.json").read_text())


def stop_process(proc: subprocess.Popen, group: bool = False, timeout: float = 20) -> None:
    """SIGTERM by pid (or by the process group this test created), then SIGKILL if still alive."""
    if proc.poll() is not None:
        return
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    try:
        send(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
