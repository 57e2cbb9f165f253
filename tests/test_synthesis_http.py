"""End to end over HTTP: seeds -> describe -> reason -> anchor -> verify against the fake teacher server.

Each stage talks to its own model name through :class:`OpenAITeacher`, results land in a
:class:`WorkStore` through ``pipeline.executor.run_stage``, every request goes through the request
cache. The server's counters prove that no successful request is ever sent twice, also across a
``kill -9`` of the synthesis process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.executor import run_stage
from pipeline.seeds.config import SeedsConfig
from pipeline.seeds.procedural import iter_procedural
from pipeline.store import WorkStore
from pipeline.synthesis.cache import RequestCache
from pipeline.synthesis.stages import StageConfig
from pipeline.synthesis.teachers.base import TeacherConfig
from pipeline.verify import VerifyStage
from tests.support.samples import teacher_stage
from tests.support.teacher_server import ChatCall, ResponderError, TeacherServer

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"describe": "describer-test", "reason": "reasoner-test", "anchor": "anchorer-test"}
TEACHER_REASONS = {"teacher_failed", "teacher_timeout", "teacher_rate_limited", "teacher_malformed",
                   "teacher_truncated", "teacher_refused"}


def seeds(n: int) -> list[dict]:
    return list(iter_procedural(SeedsConfig(n=n, image_size=320)))


def answer_text(call: ChatCall) -> str:
    """A well-formed answer per stage: the chain ends in the seed's gold answer."""
    record = call.record
    if record is None or call.stage is None:
        raise ResponderError(400, "unknown record or stage")
    gold = record["gold_answer"]
    if call.stage == "describe":
        return f"Global scan: a {record['source'].split('/')[-1]} figure. Parts: labelled elements. Scene: as drawn."
    if call.stage == "reason":
        return (f"<think>Read the values from the description. Compute step by step. Wait, is this right? "
                f"Re-check the arithmetic: it holds. The result is {gold}.</think><answer>{gold}</answer>")
    if call.stage == "anchor":
        return (f"<think>Look back at the image: the values are as labelled. Compute step by step. "
                f"Check the image again: the labels agree. The result is {gold}.</think>\n<answer>{gold}</answer>")
    raise ResponderError(400, f"unexpected stage {call.stage}")


def teacher_config(base_url: str, stage: str, **overrides) -> TeacherConfig:
    settings = {"backend": "openai", "model": MODELS[stage], "base_url": base_url, "max_concurrency": 4,
                "timeout_s": 30.0, "max_retries": 6, "backoff_base_s": 0.005, "backoff_max_s": 0.02,
                "max_pixels": None, "price_input_per_mtok": 1.0, "price_output_per_mtok": 2.0}
    return TeacherConfig(**{**settings, **overrides})


def synthesize(store_root: Path, records: list[dict], base_url: str, shard_size: int = 64,
               **teacher_overrides) -> dict:
    """The three teacher stages and verify, each stage reading the previous stage's results."""
    store = WorkStore(store_root)
    cache = RequestCache(store_root / "requests.sqlite")
    inputs, summaries = records, {}
    with store.locked():
        for name in ("describe", "reason", "anchor"):
            config = StageConfig(teacher=teacher_config(base_url, name, **teacher_overrides))
            with teacher_stage(name, config, cache=cache, progress=False) as stage:
                run_stage(stage, store.stage(name), inputs, shard_size=shard_size)
                summaries[name] = stage.usage_summary()
            inputs = store.stage(name).iter_records()
        run_stage(VerifyStage(), store.stage("verify"), inputs, shard_size=shard_size)
    return summaries


def accounted(store: WorkStore, stage: str) -> tuple[set[str], set[str], dict[str, int]]:
    results = {r["id"] for r in store.stage(stage).iter_records()}
    rejects = {r["id"] for r in store.stage(stage).iter_rejects()}
    return results, rejects, store.stage(stage).reject_reasons()


def test_clean_run_keeps_every_sample_and_caches_every_request(tmp_path):
    records = seeds(8)
    with TeacherServer(answer_text) as server:
        server.register(records)
        summaries = synthesize(tmp_path / "store", records, server.base_url)
        assert server.total_requests == 24 and not server.duplicates()
        assert summaries["reason"]["requests"] == 8 and summaries["reason"]["cost_usd"] > 0
        # a second run is served from the stores and the cache: zero requests
        synthesize(tmp_path / "store", records, server.base_url)
        assert server.total_requests == 24
    store = WorkStore(tmp_path / "store")
    verified = list(store.stage("verify").iter_records())
    assert len(verified) == 8 and all(r["verification"]["correct"] for r in verified)
    for rec in verified:
        assert {rec["stages"][s]["teacher"]["model"] for s in MODELS} == set(MODELS.values())
        assert rec["n_anchors"] == 2 and rec["programmatic"] is False
    assert len(RequestCache(tmp_path / "store" / "requests.sqlite")) == 24


def test_fault_mix_ends_with_every_sample_kept_or_rejected_with_a_reason(tmp_path):
    records = seeds(12)
    faults = {"500": 0.08, "502": 0.06, "503": 0.06, "429": 0.1, "slow": 0.05, "malformed": 0.05}
    # timeout well above a normal answer's latency even on a loaded machine: a request the server
    # answered but the client gave up on would be sent again and count as a duplicate
    with TeacherServer(answer_text, fault_rates=faults, seed=7, slow_s=3.0) as server:
        server.register(records)
        # one retry only, so that some requests fail for good and become rejects
        synthesize(tmp_path / "store", records, server.base_url, max_retries=1, timeout_s=1.0)
        assert not server.duplicates()
        assert set(server.outcomes) - {"ok"}, "the fault mix injected no fault"
    store = WorkStore(tmp_path / "store")
    expected = {r["id"] for r in records}
    for stage in ("describe", "reason", "anchor", "verify"):
        results, rejects, reasons = accounted(store, stage)
        assert results | rejects == expected and not results & rejects, stage
        assert set(reasons) <= TEACHER_REASONS | {"missing_input"}, (stage, reasons)
        expected = results
    assert expected, "no sample survived the fault mix"
    assert any(accounted(store, s)[1] for s in ("describe", "reason", "anchor")), "no request failed for good"


class GatedAnswers:
    """Answers the first ``limit`` requests; later ones wait until released, then fail with 503.

    Lets the test kill the client at a moment when every success has been answered and every
    other request is held open by the server (nothing half-delivered).
    """

    def __init__(self, limit: int):
        self.limit, self.answered = limit, 0
        self.release = threading.Event()
        self.open = False

    async def __call__(self, call: ChatCall) -> str:
        if not self.open:
            if self.answered >= self.limit:
                while not self.release.is_set():
                    await asyncio.sleep(0.01)
                raise ResponderError(503, "released after the client was killed")
            self.answered += 1
        return answer_text(call)


def child_main(store_root: str, base_url: str) -> None:
    """Entry point of the synthesis subprocess (run by the kill -9 test)."""
    records = seeds(int(os.environ["AVAR_TEST_N"]))
    summaries = synthesize(Path(store_root), records, base_url, max_concurrency=2, timeout_s=30.0)
    print(json.dumps({name: s["cache_hits"] for name, s in summaries.items()}), flush=True)


def _spawn(store_root: Path, base_url: str, n: int) -> subprocess.Popen:
    code = f"from tests.test_synthesis_http import child_main; child_main({str(store_root)!r}, {base_url!r})"
    env = dict(os.environ, AVAR_TEST_N=str(n), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_mid_stage_then_restart_repeats_no_successful_request(tmp_path):
    n, done_before_kill = 6, 9  # describe (6) finished and stored, reason 3 of 6 answered
    records = seeds(n)
    gate = GatedAnswers(done_before_kill)
    store_root = tmp_path / "store"
    with TeacherServer(gate) as server:
        server.register(records)
        child = _spawn(store_root, server.base_url, n)
        cache_path = store_root / "requests.sqlite"
        deadline = time.monotonic() + 120
        while True:  # every answered request committed, the next ones held by the server
            committed = len(RequestCache(cache_path)) if cache_path.exists() else 0
            if committed == done_before_kill and server.in_flight > 0:
                break
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"child stuck: {committed} committed"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        assert child.returncode == -signal.SIGKILL
        assert WorkStore(store_root).stage("describe").counts()["result"] == n
        assert not WorkStore(store_root).stage("reason").shards()  # reason had not written a shard
        gate.release.set()
        gate.open = True

        restarted = _spawn(store_root, server.base_url, n)
        out, err = restarted.communicate(timeout=180)
        assert restarted.returncode == 0, err[-3000:]
        assert not server.duplicates(), server.duplicates()
        assert sum(server.success_counts.values()) == 3 * n
    assert json.loads(out.strip().splitlines()[-1]) == {"describe": 0, "reason": 3, "anchor": 0}
    verified = list(WorkStore(store_root).stage("verify").iter_records())
    assert len(verified) == n and all(r["verification"]["correct"] for r in verified)
    cached_reasons = [r for r in verified if r["stages"]["reason"]["cached"]]
    assert len(cached_reasons) == 3
