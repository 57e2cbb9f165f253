"""Live progress of a run (flows/progress.py) and the final report (flows/report.py): the numbers
a person reads in the Prefect UI, with labels, never a raw dict."""

from __future__ import annotations

import logging

from flows.progress import RunProgress
from flows.report import funnel_rows, usage_rows, vas_lines


def _report(shard, results, rejects, reasons=None, usage=None, skipped=0):
    return {"shard": shard, "results": results, "rejects": rejects, "skipped": skipped,
            "reasons": reasons or {}, "usage": usage}


def test_live_rows_add_up_the_shards_so_far(caplog):
    progress = RunProgress(["describe", "reason"], n_shards=2, logger=logging.getLogger("t"), artifacts=False)
    usage = {"prompt_tokens": 1200, "completion_tokens": 300, "cost_usd": 0.25}
    with caplog.at_level(logging.INFO, logger="t"):
        progress.update("describe", _report(0, 3, 1, {"teacher_failed": 1}, usage))
        progress.update("describe", _report(1, 4, 2, {"teacher_failed": 1, "image_corrupt": 1}, usage, skipped=5))
        progress.update("reason", _report(0, 2, 0))
    describe, reason = progress.rows()
    assert describe == {"Stage": "describe", "Shards": "2/2", "Results": 12, "Rejects": 3,
                        "Top reject reasons": "teacher_failed (2), image_corrupt (1)",
                        "Tokens in / out": "2,400 / 600", "Cost (USD)": "0.5000"}
    assert reason["Shards"] == "1/2" and reason["Top reject reasons"] == "none"
    assert progress.finished_shards == 3 and progress.total_shards == 4
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[-1].startswith("[3/4 shards] reason shard 0: 2 results")


def test_final_tables_have_labels_and_plain_cells():
    funnel = {"steps": {"input": 8, "correct": 6, "format": 6, "anchors": 6, "length": 6, "vas": 4, "unique": 4},
              "vas": {"criterion": "quantile", "metric": "normalized", "resolved_threshold": 1.5,
                      "histograms": {"raw": {"edges": [0, 1], "counts": [8]}},
                      "quantiles": {"raw": {"n": 8, "min": 1.0, "p10": 1.1, "p25": 1.2, "median": 2.0,
                                            "p75": 3.0, "p90": 3.5, "max": 4.0}}}}
    rows = funnel_rows(funnel)
    assert rows[0] == {"Step": "Candidates (scored by VAS)", "Samples": 8, "Share of candidates": "100.0%"}
    assert rows[-1] == {"Step": "Not a duplicate: kept", "Samples": 4, "Share of candidates": "50.0%"}
    text = "\n".join(vas_lines(funnel["vas"]))
    assert "| raw | 8 | 1 | 1.1 | 1.2 | 2 | 3 | 3.5 | 4 |" in text and "edges" not in text
    summary = {"stages": {"reason": [{"usage": {"requests": 3, "failures": 1, "cache_hits": 2, "prompt_tokens": 10,
                                                "completion_tokens": 5, "cost_usd": 0.125}}] * 2,
                          "verify": [{"results": 1}]}}
    assert usage_rows(summary) == [{"Stage": "reason", "Requests": 6, "Failed requests": 2, "Cache hits": 4,
                                    "Prompt tokens": 20, "Completion tokens": 10, "Est. cost (USD)": "0.2500"}]
    for row in rows + usage_rows(summary):
        assert not any(isinstance(v, dict | list) for v in row.values())


def test_batch_status_of_each_shard_reaches_the_table_and_the_console(tmp_path, caplog):
    from pipeline.synthesis.batch.state import BatchState, Job, LineRef

    state = BatchState(tmp_path / "requests.sqlite")

    def job(uid, stage, shard, status, **counts):
        job = Job(uid=uid, stage=stage, shard=shard, model="m", endpoint="e", run="r", config="c",
                  status=status, remote_status=status, input_path=None, n_requests=64, n_bytes=1,
                  est_tokens=1)
        state.add_job(job, [LineRef(f"{uid}-{i}", i, 1) for i in range(2)])
        return state.update(job, **counts) if counts else job

    running = job("a", "describe", 0, "in_progress", total=64, completed=38, failed=2)
    job("b", "describe", 1, "validating")
    progress = RunProgress(["describe", "reason"], n_shards=2, logger=logging.getLogger("t"), artifacts=False,
                           batch_state=tmp_path / "requests.sqlite")
    with caplog.at_level(logging.INFO, logger="t"):
        assert progress.watch_batches_once() == ["[batches] describe shard 0: in progress 40/64",
                                                 "[batches] describe shard 1: validating"]
        assert progress.watch_batches_once() == []  # nothing changed: nothing printed
        state.update(running, status="finalizing", remote_status="finalizing")
        assert progress.watch_batches_once() == ["[batches] describe shard 0: finalizing"]
        state.collected_with(running, {"a-0": "ok", "a-1": "ok"}, [])
        assert progress.watch_batches_once() == ["[batches] describe shard 0: completed"]
    describe, reason = progress.rows()
    assert describe["Batches"] == "shard 0: completed; shard 1: validating" and reason["Batches"] == "none"
    assert [r.getMessage() for r in caplog.records][-1] == "[batches] describe shard 0: completed"
    plain = RunProgress(["describe"], n_shards=1, artifacts=False)  # no batch teacher: no column
    assert "Batches" not in plain.rows()[0]
