"""Shared helpers of the reliability suite (crash, concurrency, secrets, bad inputs, resources).

- :class:`HoldingResponder`: wraps a responder of :class:`tests.support.teacher_server.TeacherServer` so
  the test can hold new requests at the server, wait until every answered request is committed
  to the client's request cache, ``kill -9`` the client, then fail the held requests. That is a
  kill at an arbitrary point of a teacher stage with nothing half-delivered, so the server's
  success counter can prove that no successful request is ever sent twice.
- :class:`AuthCheckingServer`: a TeacherServer that records whether each request carried the
  expected bearer key (a boolean, never the key itself).
- flow subprocess helpers: ``python -m flows.synth`` on a config with ``--set`` overrides that
  point every output under one folder and the three teacher stages at a test server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import pyarrow.parquet as pq

from tests.support.flows import CI_CONFIG, PYTHON, REPO, flow_env, free_port, stop_process
from tests.support.flows import stage_row_ids as stage_ids  # noqa: F401 - the reliability suite's name
from tests.support.teacher_server import (
    TEST_MODELS,
    ChatCall,
    ProgrammaticResponder,
    ResponderError,
    TeacherServer,
)

PREFECT = str(Path(PYTHON).parent / "prefect")
TEACHER_STAGES = ("describe", "reason", "anchor")
STORE_STAGES = ("seeds", "describe", "reason", "anchor", "verify", "vas", "filter")
MODELS = TEST_MODELS
# Faults that the OpenAI teacher retries; with enough retries none of them ends as a reject, so
# an interrupted run and an uninterrupted run keep exactly the same samples.
RETRYABLE_FAULTS = {"500": 0.06, "502": 0.04, "503": 0.04, "429": 0.06, "malformed": 0.04}


# --------------------------------------------------------------------------- teacher server

class HoldingResponder:
    """Wraps a responder; :meth:`hold` parks new requests, :meth:`fail_held` answers them 503.

    ``answering`` counts requests inside the wrapped responder, so after :meth:`hold` the test
    can wait for it to reach zero: from then on no new success can be produced.
    """

    def __init__(self, inner: Callable | None = None):
        self.inner = inner or ProgrammaticResponder()
        self._lock = threading.Lock()
        self._holding = False
        self._fail_held = False
        self.held = 0
        self.answering = 0

    def hold(self) -> None:
        with self._lock:
            self._holding, self._fail_held = True, False

    def fail_held(self) -> None:
        """Held requests get a 503 (their client is gone); new requests are served normally."""
        with self._lock:
            self._fail_held, self._holding = True, False

    async def __call__(self, call: ChatCall) -> str:
        with self._lock:
            holding = self._holding
            if holding:
                self.held += 1
            else:
                self.answering += 1
        if holding:
            while True:
                with self._lock:
                    if self._fail_held:
                        self.held -= 1
                        break
                await asyncio.sleep(0.01)
            raise ResponderError(503, "held while the client was killed")
        try:
            text = self.inner(call)
            return await text if asyncio.iscoroutine(text) else text
        finally:
            with self._lock:
                self.answering -= 1


class AuthCheckingServer(TeacherServer):
    """Counts requests with and without ``Authorization: Bearer <expected>`` (no key stored)."""

    def __init__(self, *args, expected_key: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._expected_digest = hashlib.sha256(f"Bearer {expected_key}".encode()).hexdigest()
        self.auth_ok = 0
        self.auth_bad = 0

    async def _chat(self, request):
        seen = hashlib.sha256(request.headers.get("Authorization", "").encode()).hexdigest()
        with self._lock:
            if seen == self._expected_digest:
                self.auth_ok += 1
            else:
                self.auth_bad += 1
        return await super()._chat(request)


def committed_requests(cache_path: Path) -> int:
    """Rows in the flow's request cache (read-only, safe while the flow writes)."""
    if not cache_path.exists():
        return 0
    import sqlite3
    con = sqlite3.connect(f"file:{cache_path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet
        return 0
    finally:
        con.close()


def quiesce_teacher(server: TeacherServer, responder: HoldingResponder, cache_path: Path,
                    child: subprocess.Popen, timeout: float = 120) -> int:
    """Hold new requests and wait until every success the server sent is in the client's cache.

    Returns the number of committed requests. The caller then kills the client and calls
    ``responder.fail_held()``.
    """
    responder.hold()
    deadline = time.monotonic() + timeout
    stable = 0
    while stable < 3:
        assert child.poll() is None, "the flow ended while its teacher requests were held"
        assert time.monotonic() < deadline, "the flow did not commit its answered requests in time"
        answered = len(server.success_counts)  # distinct requests: duplicates are the test's business
        done = responder.answering == 0 and committed_requests(cache_path) == answered
        stable = stable + 1 if done else 0
        time.sleep(0.05)
    return committed_requests(cache_path)


# --------------------------------------------------------------------------- flow subprocesses

def output_overrides(root: Path) -> list[str]:
    """Every output of a run under ``root`` (store, published folder, card folder)."""
    return [f"run.store_dir={root / 'store'}", f"publish.out_dir={root / 'published'}",
            f"publish.cards_dir={root / 'cards'}", "run.progress=false", "run.retry_delay_s=0"]


def openai_overrides(base_url: str, api_key_env: str = "OPENAI_API_KEY", max_retries: int = 12,
                     timeout_s: float = 30.0) -> list[str]:
    """The three teacher stages on the OpenAI backend, pointed at a test server."""
    out = []
    for stage in TEACHER_STAGES:
        prefix = f"stages.{stage}.teacher"
        out += [f"{prefix}.backend=openai", f"{prefix}.model={MODELS[stage]}",
                f"{prefix}.base_url={base_url}", f"{prefix}.api_key_env={api_key_env}",
                f"{prefix}.max_retries={max_retries}", f"{prefix}.timeout_s={timeout_s}",
                f"{prefix}.backoff_base_s=0.005", f"{prefix}.backoff_max_s=0.02",
                f"{prefix}.max_concurrency=4"]
    return out


def flow_command(overrides: list[str], config: Path = CI_CONFIG) -> list[str]:
    cmd = [PYTHON, "-m", "flows.synth", "--config", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def spawn_flow(overrides: list[str], env: dict, log: Path, config: Path = CI_CONFIG) -> subprocess.Popen:
    """Start the flow in its own process group (so kill -9 also reaches a temporary server)."""
    handle = open(log, "a")  # noqa: SIM115 - the child holds it; closed when the test ends
    handle.write(f"\n===== {time.strftime('%H:%M:%S')} {' '.join(overrides[-2:])}\n")
    handle.flush()
    return subprocess.Popen(flow_command(overrides, config), cwd=REPO, env=env, stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_9(proc: subprocess.Popen) -> None:
    """SIGKILL the flow's process group (this test created it), then reap the flow."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02,
               alive: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the flow exited (rc {alive.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class PrefectServer:
    """``prefect server start`` on a free port with its own home; shared by several flow runs."""

    def __init__(self, home: Path):
        self.home = home
        self.api_url = f"http://127.0.0.1:{free_port()}/api"
        self.proc: subprocess.Popen | None = None

    def healthy(self) -> bool:
        import httpx
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def __enter__(self) -> Self:
        self.home.mkdir(parents=True, exist_ok=True)
        port = self.api_url.rsplit(":", 1)[1].split("/")[0]
        log = open(self.home / "server.log", "w")  # lives as long as the server
        self.proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port],
                                     cwd=self.home, env=flow_env(self.home / "home", self.api_url),
                                     stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.healthy() or self.proc.poll() is not None, 120, "the prefect server",
                   interval=0.3)
        assert self.proc.poll() is None, (self.home / "server.log").read_text()[-3000:]
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc)


# --------------------------------------------------------------------------- outputs

def seed_records(overrides: list[str], config: Path = CI_CONFIG) -> list[dict]:
    """The seeds a flow run on ``config`` + ``overrides`` will generate (to register them)."""
    from flows.config import load_synth_config
    from pipeline.seeds import iter_seeds
    return [s for s in iter_seeds(load_synth_config(config, overrides).seeds) if isinstance(s, dict)]


def published_rows(out_dir: Path) -> dict[str, dict]:
    """Published rows by id over every split, each row with its split name."""
    rows: dict[str, dict] = {}
    for shard in sorted((out_dir / "data").glob("*.parquet")):
        split = shard.name.split("-")[0]
        for row in pq.read_table(shard).to_pylist():
            assert row["id"] not in rows, f"id {row['id']} published twice"
            rows[row["id"]] = {**row, "split": split}
    return rows


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def gold_responder(call: ChatCall) -> str:
    """A well-formed answer per stage for any registered seed: the chain ends in its gold answer.

    For seeds without scene metadata (local datasets), where the programmatic teacher cannot work.
    """
    record = call.record
    if record is None or call.stage is None:
        raise ResponderError(400, "unknown record or stage")
    gold = record["gold_answer"]
    if call.stage == "describe":
        # the id makes each description unique, so the server can tell records with the same
        # question apart in the text-only reason and anchor prompts (which quote the description)
        return (f"Global scan: figure {record['id'][:8]}. Parts: labelled elements. Links: as drawn. "
                "Scene: as drawn.")
    if call.stage == "reason":
        return (f"<think>Read the values. Compute step by step. Wait, is this right? Re-check: it "
                f"holds. The result is {gold}.</think><answer>{gold}</answer>")
    if call.stage == "anchor":
        return (f"<think>Look back at the image: the values are as labelled. Compute step by step. "
                f"Check the image again: the labels agree. The result is {gold}.</think>\n"
                f"<answer>{gold}</answer>")
    raise ResponderError(400, f"unexpected stage {call.stage}")


def run_pipeline(config, passthrough_vas: bool = False) -> dict:
    """What the flow's tasks do, in one process (flows.components, no Prefect).

    ``passthrough_vas``: the VAS stage writes a pseudo score instead of running the tiny model
    (tests.support.stages.PassthroughVAS), for tests about the store rather than the scores.
    """
    from flows import components
    from pipeline.plan import DEFAULT_PLAN
    from tests.support.stages import PassthroughVAS

    plan = DEFAULT_PLAN.replacing("vas", PassthroughVAS) if passthrough_vas else DEFAULT_PLAN
    return components.run_local(config, plan)
