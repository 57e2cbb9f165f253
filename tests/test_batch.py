"""Batch teachers (pipeline.synthesis.batch) against the test server's files + batches protocol.

Each test runs a real describe stage in ``mode: batch`` over HTTP against
:class:`tests.support.teacher_server.TeacherServer` (tests/support/teacher_batches.py), whose
batches move one step per status read, and checks what a provider would bill: every line
answered once (``success_counts``), every file uploaded once, every request set in one batch.
"""

from __future__ import annotations

import re
import shutil
import threading
import time

import pytest

from pipeline.synthesis.batch.config import BatchConfig
from pipeline.synthesis.batch.manage import cancel_batches, list_batches
from pipeline.synthesis.batch.runner import BatchCancelled, BatchesPending
from pipeline.synthesis.batch.state import BatchState
from pipeline.synthesis.cache import RequestCache
from pipeline.synthesis.stages import DescribeStage, StageConfig
from pipeline.synthesis.teachers.base import TeacherConfig, TeacherFatalError
from tests.support.teacher_server import ChatCall, ChatReply, ResponderError, TeacherServer
from tests.test_stages import seed

PROBLEM = re.compile(r"Triangle (\d+):")


def describe(call: ChatCall) -> str:
    """A description naming the problem's number: a line matched to the wrong request shows."""
    text = " ".join(p.get("text", "") for m in call.messages for p in m["content"] if isinstance(p, dict))
    return f"A triangle for problem {PROBLEM.search(text).group(1)}; angles 50 and 60 are marked."


def problem_of(call: ChatCall) -> int:
    text = " ".join(p.get("text", "") for m in call.messages for p in m["content"] if isinstance(p, dict))
    return int(PROBLEM.search(text).group(1))


def teacher(server: TeacherServer, **batch) -> TeacherConfig:
    settings = {"poll_initial_s": 0.001, "poll_max_s": 0.01, **batch}
    return TeacherConfig(backend="openai", model="describer-test", base_url=server.base_url, mode="batch",
                         max_retries=2, backoff_base_s=0.001, backoff_max_s=0.002, timeout_s=10,
                         batch=BatchConfig(**settings))


def stage(config: TeacherConfig, cache: RequestCache, wait: bool = True) -> DescribeStage:
    return DescribeStage(StageConfig(teacher=config), cache=cache, progress=False, batch_wait=wait)


def texts(out: list) -> dict[int, str]:
    return {int(PROBLEM.search(r["question"]).group(1)): r["stages"]["describe"]["text"]
            for r in out if isinstance(r, dict)}


def assert_paid_once(server: TeacherServer) -> None:
    assert not server.duplicates(), server.duplicates()
    assert all(n == 1 for n in server.batches.input_uploads().values()), "a file was uploaded twice"


RECORDS = [seed(i) for i in range(8)]


def test_a_batch_goes_through_every_status_and_gives_the_online_records(tmp_path):
    with TeacherServer(describe) as server:
        server.batches.behaviour.validating_polls = 2
        server.batches.behaviour.lines_per_poll = 3
        server.batches.behaviour.finalizing_polls = 2
        cache = RequestCache(tmp_path / "batch.sqlite")
        seen: list[tuple[str, int, int]] = []
        with stage(teacher(server), cache) as batched:
            api = batched._batch_runner().api
            retrieve, download = api.retrieve, api.download

            def spy_retrieve(batch_id):
                batch = retrieve(batch_id)
                seen.append((batch.status, batch.completed + batch.failed, batch.total))
                return batch

            def spy_download(file_id, dest):
                seen.append(("download", 0, 0))
                return download(file_id, dest)

            api.retrieve, api.download = spy_retrieve, spy_download
            out = batched.run(RECORDS)
        statuses = [s for s, _, _ in seen]
        assert list(dict.fromkeys(statuses)) == ["validating", "in_progress", "finalizing", "completed", "download"]
        assert [n for s, n, _ in seen if s == "in_progress"] == [0, 3, 6]  # finalizing is still pending
        assert statuses.index("download") > statuses.index("completed")
        assert all(r["stages"]["describe"]["cached"] is False for r in out)
        assert texts(out) == {i: f"A triangle for problem {i}; angles 50 and 60 are marked." for i in range(8)}

        online = TeacherConfig(backend="openai", model="describer-test", base_url=server.base_url)
        with DescribeStage(StageConfig(teacher=online), cache=RequestCache(tmp_path / "online.sqlite"),
                           progress=False) as direct:
            reference = direct.run(RECORDS)
        drop = ("finished_at", "teacher")
        assert [{k: v for k, v in r["stages"]["describe"].items() if k not in drop} for r in out] == \
            [{k: v for k, v in r["stages"]["describe"].items() if k not in drop} for r in reference]

        calls = dict(server.batches.calls)
        with stage(teacher(server), cache) as again:  # a re-run: everything from the cache
            rerun = again.run(RECORDS)
        assert dict(server.batches.calls) == calls
        assert all(r["stages"]["describe"]["cached"] is True for r in rerun)
        assert again.usage_summary()["cache_hits"] == 8 and again.usage_summary()["requests"] == 0
    # the online run sent the same 8 requests again: each request body was answered twice in all,
    # once per mode, never twice by the batches
    assert set(server.success_counts.values()) == {2}


def test_failed_lines_are_resubmitted_then_named_rejects(tmp_path):
    failures = {2: 1, 5: 99}  # problem -> how many times its line fails (HTTP 500)
    arrivals: dict[int, int] = {}

    def flaky(call: ChatCall) -> str:
        i = problem_of(call)
        arrivals[i] = arrivals.get(i, 0) + 1
        if arrivals[i] <= failures.get(i, 0):
            raise ResponderError(500, "injected line failure")
        return describe(call)

    with TeacherServer(flaky) as server:
        with stage(teacher(server, max_attempts=3), RequestCache(tmp_path / "c.sqlite")) as batched:
            out = batched.run(RECORDS)
        assert_paid_once(server)
        per_request = server.batches.lines_submitted()
    reject = out[5]
    assert reject.reason == "teacher_failed" and reject.field == "$.stages.describe.text"
    assert reject.message.startswith(f"record {RECORDS[5]['id']}: stage describe:")
    assert "HTTP 500: injected line failure" in reject.message
    assert re.search(r"3 attempt\(s\) in batch\(es\) batch-\d+, batch-\d+, batch-\d+", reject.message)
    assert set(texts(out)) == {0, 1, 2, 3, 4, 6, 7}  # each answer matched to its own request
    assert sorted(per_request.values()) == [1] * 6 + [2, 3]  # problem 2 twice, problem 5 three times


def test_an_expired_batch_keeps_its_finished_lines_and_resubmits_only_the_rest(tmp_path):
    with TeacherServer(describe) as server:
        server.batches.behaviour.lines_per_poll = 1
        server.batches.behaviour.expire_after_lines = 3
        server.batches.behaviour.expirations = 1
        with stage(teacher(server), RequestCache(tmp_path / "c.sqlite")) as batched:
            out = batched.run(RECORDS)
        assert_paid_once(server)
        statuses = [b.status for b in server.batches.batches.values()]
        per_request = server.batches.lines_submitted()
    assert statuses == ["expired", "completed"]
    assert sorted(per_request.values()) == [1] * 3 + [2] * 5  # the 3 finished lines were not sent again
    assert len(texts(out)) == 8


def test_cancel_keeps_finished_lines_and_a_rerun_submits_the_rest(tmp_path):
    with TeacherServer(describe) as server:
        server.batches.behaviour.lines_per_poll = 1
        config = teacher(server, poll_initial_s=0.05, poll_max_s=0.05)
        cache = RequestCache(tmp_path / "c.sqlite")
        raised: list[BaseException] = []

        def run() -> None:
            try:
                with stage(config, cache) as batched:
                    batched.run(RECORDS)
            except BaseException as err:  # noqa: BLE001 - the test reads it
                raised.append(err)

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 30
        while not any(len(b.done) >= 3 for b in server.batches.batches.values()):
            assert time.monotonic() < deadline, "the batch did not start"
            time.sleep(0.01)
        listed = list_batches(cache.path, {"describe": config})
        assert next(r["status"] for r in listed).startswith("in progress")
        touched = cancel_batches(cache.path, {"describe": config})
        worker.join(30)
        assert len(touched) == 1 and isinstance(raised[0], BatchCancelled), raised
        assert "cancelled on request" in str(raised[0])
        finished = len([k for k in server.success_counts])
        assert 3 <= finished < 8 and len(RequestCache(cache.path)) == finished  # finished lines kept
        with stage(teacher(server), cache) as again:
            out = again.run(RECORDS)
        assert_paid_once(server)
        assert [b.status for b in server.batches.batches.values()] == ["cancelled", "completed"]
        assert len(server.batches.batches["batch-000002"].lines) == 8 - finished  # only the rest
    assert len(texts(out)) == 8


def test_a_file_over_the_providers_size_limit_is_split(tmp_path):
    with TeacherServer(describe) as server:  # the size of one line
        with stage(teacher(server), RequestCache(tmp_path / "size.sqlite")) as probe:
            probe.run(RECORDS[:1])
        one_line = next(len(f.data) for f in server.batches.files.values() if f.purpose == "batch")
    with TeacherServer(describe) as server:
        server.batches.behaviour.max_file_bytes = 3 * one_line + 10
        with stage(teacher(server), RequestCache(tmp_path / "c.sqlite")) as batched:
            out = batched.run(RECORDS[1:])
        accepted = [f for f in server.batches.files.values() if f.purpose == "batch"]
        assert server.batches.refusals[413] >= 1  # 7 lines in one file: refused, then split
        assert all(len(f.data) <= 3 * one_line + 10 for f in accepted)
        assert_paid_once(server)
        assert len(texts(out)) == 7

        server.batches.behaviour.max_file_bytes = one_line // 2  # one request alone is too big
        with stage(teacher(server), RequestCache(tmp_path / "small.sqlite")) as batched:
            [reject] = batched.run([seed(9)])
    assert reject.reason == "teacher_failed" and "HTTP 413" in reject.message


def test_token_limit_exceeded_waits_for_the_queue_to_drain(tmp_path):
    with TeacherServer(describe) as server:
        server.batches.behaviour.lines_per_poll = 1
        config = teacher(server, max_requests_per_file=4, poll_max_s=0.02)
        with stage(config, RequestCache(tmp_path / "probe.sqlite")) as probe:  # one file's tokens
            probe.run(RECORDS[:4])
        tokens = next(iter(server.batches.batches.values())).tokens
        server.batches.behaviour.token_limit = tokens + tokens // 2  # room for one file at a time
        server.reset_counters()
        config.batch.recover_scan = 0  # (the probe's batch is not this run's)
        with stage(config, RequestCache(tmp_path / "c.sqlite")) as batched:
            out = batched.run(RECORDS[4:] + [seed(i) for i in range(8, 12)])
        assert_paid_once(server)
        failed = [b for b in server.batches.batches.values() if b.status == "failed"]
    assert failed and failed[0].errors[0]["code"] == "token_limit_exceeded"
    assert len(texts(out)) == 8


def test_a_file_alone_over_the_token_limit_stops_the_stage_with_one_error(tmp_path):
    with TeacherServer(describe) as server:
        server.batches.behaviour.token_limit = 10
        config = teacher(server, poll_max_s=0.01)
        config.breaker_after = 3
        with stage(config, RequestCache(tmp_path / "c.sqlite")) as batched, \
                pytest.raises(TeacherFatalError, match="the same refusal 3 times in a row") as err:
            batched.run(RECORDS)
        assert "token_limit_exceeded" in str(err.value)
        assert len(server.batches.batches) == 3 and not server.success_counts  # nothing ran


def test_a_refusal_on_every_line_trips_the_breaker_after_caching_the_answers(tmp_path):
    def picky(call: ChatCall) -> str:
        if problem_of(call) >= 3:
            raise ResponderError(400, "image is too large for this model (1024 > 512 pixels)")
        return describe(call)

    cache = RequestCache(tmp_path / "c.sqlite")
    with TeacherServer(picky) as server:
        config = teacher(server)
        config.breaker_after = 4
        with stage(config, cache) as batched, pytest.raises(TeacherFatalError, match="4 times in a row"):
            batched.run(RECORDS)
    assert len(cache) == 3  # the answered lines are in the cache


def test_no_wait_submits_and_a_rerun_collects(tmp_path):
    cache = RequestCache(tmp_path / "c.sqlite")
    with TeacherServer(describe) as server:
        with stage(teacher(server), cache, wait=False) as batched, pytest.raises(BatchesPending) as pending:
            batched.run(RECORDS)
        assert "1 in progress" in str(pending.value) and "re-run" in str(pending.value)
        assert not server.success_counts  # submitted, nothing ran yet
        server.batches.behaviour.steps_per_read = 4
        with stage(teacher(server), cache, wait=False) as again:
            out = again.run(RECORDS)
        assert len(server.batches.batches) == 1  # collected, not submitted again
        assert_paid_once(server)
    assert len(texts(out)) == 8 and all(r["stages"]["describe"]["cached"] is False for r in out)


def test_a_run_whose_state_was_lost_finds_its_batches_by_metadata(tmp_path):
    store = tmp_path / "store"
    with TeacherServer(describe) as server:
        first = RequestCache(store / "requests.sqlite")
        with stage(teacher(server), first, wait=False) as batched, pytest.raises(BatchesPending):
            batched.run(RECORDS)
        first.close()
        [submitted] = server.batches.batches.values()
        assert submitted.metadata["avar_stage"] == "describe" and submitted.metadata["avar_job"]
        shutil.rmtree(store)  # the store is gone: cache, batch state, local files
        with stage(teacher(server), RequestCache(store / "requests.sqlite")) as again:
            out = again.run(RECORDS)
        assert server.batches.calls["list_batches"] >= 1
        assert len(server.batches.batches) == 1 and server.batches.calls["upload"] == 1
        assert_paid_once(server)
    assert len(texts(out)) == 8
    assert [j.batch_id for j in BatchState(store / "requests.sqlite").jobs()] == [submitted.id]


def test_lost_answers_to_upload_and_create_never_make_a_second_file_or_batch(tmp_path):
    with TeacherServer(describe) as server:
        server.batches.hold("upload", "create")
        config = teacher(server)
        config.timeout_s, config.max_retries = 0.3, 8
        config.backoff_base_s = config.backoff_max_s = 0.2
        releaser = threading.Timer(1.5, server.batches.release)
        releaser.start()
        with stage(config, RequestCache(tmp_path / "c.sqlite")) as batched:
            out = batched.run(RECORDS)
        releaser.join()
        assert server.batches.calls["upload"] == 1 and server.batches.calls["create"] == 1
        assert server.batches.calls["list_files"] >= 1 and server.batches.calls["list_batches"] >= 1
        assert_paid_once(server)
    assert len(texts(out)) == 8


def test_a_rerun_after_a_cancel_with_no_flow_running_continues(tmp_path):
    cache = RequestCache(tmp_path / "c.sqlite")
    with TeacherServer(describe) as server:
        server.batches.behaviour.lines_per_poll = 3
        with stage(teacher(server), cache, wait=False) as batched, pytest.raises(BatchesPending):
            batched.run(RECORDS)  # submitted; the next read answers 3 lines
        list_batches(cache.path, {"describe": teacher(server)})  # a look: 3 lines done
        [cancelled] = cancel_batches(cache.path, {"describe": teacher(server)})
        assert cancelled["status"] == "cancelling 3/8"
        with stage(teacher(server), cache) as again:  # no BatchCancelled: this run did not wait for it
            out = again.run(RECORDS)
        assert [b.status for b in server.batches.batches.values()] == ["cancelled", "completed"]
        assert len(server.batches.batches["batch-000002"].lines) == 5
        assert_paid_once(server)
    assert len(texts(out)) == 8


def test_prefetch_batches_a_whole_shard_then_a_second_rollout_and_run_sends_nothing(tmp_path):
    def first_try_empty(call: ChatCall) -> str | ChatReply:  # a reasoning model that wrote no description
        if problem_of(call) in (1, 4) and call.sampling.get("seed") == 0:
            return ChatReply(content="", reasoning="The figure is a triangle.")
        return describe(call)

    with TeacherServer(first_try_empty) as server:
        config = StageConfig(teacher=teacher(server), rollouts=2)
        with DescribeStage(config, cache=RequestCache(tmp_path / "c.sqlite"), progress=False) as batched:
            usage = batched.prefetch(lambda: iter(RECORDS), shard=0)
            lines = [len(b.lines) for b in server.batches.batches.values()]
            out = batched.run(RECORDS)
            summary = batched.usage_summary()
        assert lines == [8, 2]  # the shard at once, then the second try of the two unusable ones
        assert len(server.batches.batches) == 2  # run() found every answer in the cache
    assert usage["requests"] == 10 and summary["requests"] == 0 and summary["cache_hits"] == 0
    assert [r["stages"]["describe"]["rollout"] for r in out] == [0, 1, 0, 0, 1, 0, 0, 0]
    assert all(r["stages"]["describe"]["cached"] is False for r in out)  # sent by this run
