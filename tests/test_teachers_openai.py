"""OpenAITeacher against the real local HTTP server in tests/support/teacher_server.py (no mocks)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import random
import traceback
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from PIL import Image

from pipeline.synthesis.teachers import build_teacher
from pipeline.synthesis.teachers.base import (
    TeacherConfig,
    TeacherError,
    TeacherRequest,
    TeacherResponse,
)
from pipeline.synthesis.teachers.openai_backend import (
    OpenAITeacher,
    TeacherFatalError,
    backoff_delay,
    parse_retry_after,
)
from pipeline.synthesis.usage import UsageTotals, cost_usd
from tests.support.teacher_server import ResponderError, TeacherServer

KEY_ENV = "AVAR_TEST_TEACHER_KEY"
SENTINEL_KEY = "sk-sentinel-7f3a9c0e5b2d4e1f"


def png(width: int, height: int, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


SMALL = png(32, 24)


def echo(call) -> str:
    """Answer with the request's own text, so tests can check which request got which answer."""
    text = " ".join(p["text"] for m in call.messages if isinstance(m["content"], list)
                    for p in m["content"] if p["type"] == "text")
    return f"<think>{text}</think><answer>{len(call.images)}</answer>"


def request(tag: str, images: list[bytes] | None = None, **sampling) -> TeacherRequest:
    images = [SMALL] if images is None else images
    parts = [{"type": "image", "index": i} for i in range(len(images))]
    return TeacherRequest(
        key=f"key-{tag}", stage="describe",
        messages=[{"role": "system", "content": "You are a careful teacher."},
                  {"role": "user", "content": [*parts, {"type": "text", "text": f"## Task: describe\nid={tag}"}]}],
        images=images, sampling={"max_tokens": 64, "temperature": 0.0, **sampling}, record={})


def config(server: TeacherServer, **overrides) -> TeacherConfig:
    values = {"backend": "openai", "model": "teacher-under-test", "base_url": server.base_url,
              "api_key_env": KEY_ENV, "max_concurrency": 4, "timeout_s": 5.0, "max_retries": 3,
              "backoff_base_s": 0.001, "backoff_max_s": 0.01}
    values.update(overrides)
    return TeacherConfig(**values)


def run(teacher: OpenAITeacher, requests: list[TeacherRequest], **kwargs):
    return asyncio.run(teacher.agenerate(requests, **kwargs))


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    with TeacherServer(echo) as srv:
        yield srv


@pytest.mark.parametrize("fault", ["500", "502", "503", "malformed", "empty"])
def test_transient_fault_then_success(server, fault):
    server.script(fault)
    teacher = OpenAITeacher(config(server))
    [result] = run(teacher, [request("a")])
    assert isinstance(result, TeacherResponse)
    assert result.text == "<think>## Task: describe\nid=a</think><answer>1</answer>"
    assert server.outcomes == {fault: 1, "ok": 1}
    assert teacher.stats["retries"] == 1 and teacher.stats["successes"] == 1
    assert not server.duplicates()


def test_timeout_then_success(server):
    server.slow_s = 10.0
    server.script("slow")
    teacher = OpenAITeacher(config(server, timeout_s=0.3))
    [result] = run(teacher, [request("a")])
    assert isinstance(result, TeacherResponse)
    assert server.outcomes == {"slow": 1, "ok": 1}
    assert sum(server.success_counts.values()) == 1  # the timed-out attempt is not a success


def test_429_retry_after_is_honoured_by_every_request(server):
    server.retry_after = "0.3"
    server.script("429")
    teacher = OpenAITeacher(config(server, max_concurrency=1, backoff_max_s=5.0))
    results = run(teacher, [request("a"), request("b")])
    assert all(isinstance(r, TeacherResponse) for r in results)
    assert [c.outcome for c in server.calls] == ["429", "ok", "ok"]
    # Retry-After, not the 1 ms base back-off, set the wait (seen at the server): the told request
    # came back after 0.3 s, and the queued one was held back too (rate limits belong to the key)
    assert server.calls[1].arrived_at - server.calls[0].arrived_at >= 0.25
    assert server.calls[2].arrived_at - server.calls[0].arrived_at >= 0.25


def test_retry_after_is_capped_by_backoff_max(server):
    server.retry_after = "3600"
    server.script("429")
    teacher = OpenAITeacher(config(server, backoff_max_s=0.05))
    [result] = run(teacher, [request("a")])
    assert isinstance(result, TeacherResponse)
    # an hour was asked for; the cap (50 ms) is what the retry waited
    assert server.calls[1].arrived_at - server.calls[0].arrived_at < 1.0


@pytest.mark.parametrize(("fault", "reason"), [
    ("503", "teacher_failed"), ("429", "teacher_rate_limited"),
    ("malformed", "teacher_malformed"), ("slow", "teacher_timeout")])
def test_persistent_failure_ends_in_a_typed_error(server, fault, reason):
    server.faults({fault: 1.0})
    server.slow_s = 5.0
    teacher = OpenAITeacher(config(server, max_retries=2, timeout_s=0.2))
    [result] = run(teacher, [request("a")])
    assert isinstance(result, TeacherError)
    assert result.reason == reason
    assert "after 3 attempts" in result.message
    assert server.total_requests == 3  # 1 try + max_retries
    assert teacher.stats[f"failed:{reason}"] == 1


def test_length_is_teacher_truncated_and_not_retried(server):
    server.script("truncated")
    teacher = OpenAITeacher(config(server))
    [result] = run(teacher, [request("a", max_tokens=7)])
    assert isinstance(result, TeacherError) and result.reason == "teacher_truncated"
    assert "max_tokens=7" in result.message
    assert server.total_requests == 1
    assert teacher.usage.failures == 1 and teacher.usage.completion_tokens > 0  # billed anyway


def test_content_filter_is_teacher_refused_and_not_retried(server):
    server.script("refused")
    [result] = run(OpenAITeacher(config(server)), [request("a")])
    assert isinstance(result, TeacherError) and result.reason == "teacher_refused"
    assert server.total_requests == 1


def test_empty_batch(server):
    assert run(OpenAITeacher(config(server)), []) == []
    assert server.total_requests == 0


def test_client_error_is_not_retried():
    def refuse(call):
        raise ResponderError(400, "prompt too long")

    with TeacherServer(refuse) as server:
        [result] = run(OpenAITeacher(config(server)), [request("a")])
        assert isinstance(result, TeacherError) and result.reason == "teacher_failed"
        assert "HTTP 400" in result.message and "prompt too long" in result.message
        assert server.total_requests == 1


def test_concurrency_bound_is_respected(server):
    server.latency_s = 0.05
    teacher = OpenAITeacher(config(server, max_concurrency=3))
    results = run(teacher, [request(str(i)) for i in range(12)])
    assert all(isinstance(r, TeacherResponse) for r in results)
    assert server.max_in_flight == 3


def test_results_in_order_and_on_result_once_per_request(server):
    server.faults({"500": 0.3})
    teacher = OpenAITeacher(config(server, max_concurrency=5, max_retries=6))
    seen: list[int] = []
    results = run(teacher, [request(str(i)) for i in range(20)],
                  on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(20))
    for i, result in enumerate(results):
        assert isinstance(result, TeacherResponse)
        assert f"id={i}</think>" in result.text
    assert sum(server.success_counts.values()) == 20 and not server.duplicates()


def test_on_result_exception_aborts_the_batch(server):
    server.latency_s = 0.05
    teacher = OpenAITeacher(config(server, max_concurrency=2))

    def fail(i, result):
        raise RuntimeError("cache is gone")

    with pytest.raises(RuntimeError, match="cache is gone"):
        run(teacher, [request(str(i)) for i in range(30)], on_result=fail)
    assert server.total_requests <= 4  # the rest were cancelled, not sent


def test_images_arrive_as_data_urls_resized_to_max_pixels(server):
    big, small = png(400, 300, "blue"), png(20, 10, "green")
    teacher = OpenAITeacher(config(server, max_pixels=10_000))
    [result] = run(teacher, [request("a", images=[big, small])])
    assert isinstance(result, TeacherResponse) and result.text.endswith("<answer>2</answer>")
    [call] = server.calls
    resized, untouched = call.images
    assert resized.mime == "image/png" and resized.width * resized.height <= 10_000
    assert resized.width / resized.height == pytest.approx(400 / 300, rel=0.05)
    assert (untouched.width, untouched.height) == (20, 10)
    assert untouched.sha256 == hashlib.sha256(small).hexdigest()  # sent byte-for-byte


def test_bad_image_index_names_the_request(server):
    bad = request("a")
    bad.messages[1]["content"].append({"type": "image", "index": 3})
    with pytest.raises(ValueError, match="request key-a: .*index 3 out of range"):
        OpenAITeacher(config(server)).build_messages(bad)


def test_corrupt_image_is_a_per_request_error(server):
    teacher = OpenAITeacher(config(server))
    good, corrupt = request("good"), request("bad", images=[b"\x89PNG\r\n\x1a\nnot really"])
    results = run(teacher, [good, corrupt])
    assert isinstance(results[0], TeacherResponse)
    assert isinstance(results[1], TeacherError) and results[1].reason.startswith("image_")
    assert server.total_requests == 1


def test_usage_and_cost(server):
    teacher = OpenAITeacher(config(server, price_input_per_mtok=2.0, price_output_per_mtok=8.0))
    results = run(teacher, [request("a"), request("b")])
    words = len(["You", "are", "a", "careful", "teacher."]) + len(["##", "Task:", "describe", "id=a"])
    for result in results:
        assert result.prompt_tokens == words + 256  # the server counts 256 tokens per image
        assert result.completion_tokens == len(result.text.split()) and result.latency_s > 0
        assert result.model == "teacher-under-test"
    assert teacher.usage.as_dict(teacher.config) == {
        "requests": 2, "failures": 0, "prompt_tokens": 2 * (words + 256),
        "completion_tokens": sum(r.completion_tokens for r in results),
        "cost_usd": round((2 * (words + 256) * 2.0 + sum(r.completion_tokens for r in results) * 8.0) / 1e6, 6)}
    assert cost_usd(teacher.config, 1_000_000, 500_000) == pytest.approx(6.0)
    totals = UsageTotals()
    for result in [*results, TeacherError("teacher_failed", "x")]:
        totals.add(result)
    assert (totals.requests, totals.failures) == (3, 1)


def test_sampling_mapping(server):
    teacher = OpenAITeacher(config(server))
    [result] = run(teacher, [request("a", top_p=0.9, seed=7, top_k=20)])
    assert isinstance(result, TeacherResponse)
    with pytest.raises(ValueError, match="request key-b: sampling.n must be 1"):
        run(teacher, [request("b", n=2)])


def test_api_key_never_leaks(server, caplog):
    def hostile(call):  # a server that echoes the key back in its error bodies
        raise ResponderError(401, f"invalid key {SENTINEL_KEY}")

    caplog.set_level(logging.DEBUG)
    server.faults({"500": 1.0})
    [failed] = run(OpenAITeacher(config(server, max_retries=1)), [request("a")])
    assert isinstance(failed, TeacherError)
    with TeacherServer(hostile) as unauthorised, pytest.raises(TeacherFatalError) as info:
        run(OpenAITeacher(config(unauthorised)), [request("b")])
    fatal = info.value
    assert "HTTP 401" in str(fatal) and KEY_ENV in str(fatal) and "***" in str(fatal)
    assert fatal.__context__ is None and fatal.__cause__ is None
    texts = [str(failed), repr(failed), str(fatal), repr(fatal),
             "".join(traceback.format_exception(fatal))]
    texts += [r.getMessage() for r in caplog.records]
    assert caplog.records, "expected log records to inspect"
    assert not [t for t in texts if SENTINEL_KEY in t]


def test_teacher_works_across_event_loops(server):
    teacher = build_teacher(config(server))
    assert isinstance(teacher, OpenAITeacher)
    for tag in ("first", "second"):  # a stage may call asyncio.run once per batch
        [result] = run(teacher, [request(tag)])
        assert isinstance(result, TeacherResponse)

    async def closing():
        await teacher.agenerate([request("third")])
        await teacher.aclose()

    asyncio.run(closing())
    assert server.total_requests == 3


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAITeacher(TeacherConfig(backend="openai", max_concurrency=0))


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "150", "retry-after": "9"}) == pytest.approx(0.15)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=5), usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now.timestamp()) == pytest.approx(5.0)
    assert parse_retry_after({"retry-after": format_datetime(now, usegmt=True)},
                             now=now.timestamp() + 10) == 0.0  # a date in the past: go now
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_backoff_delay_is_full_jitter_and_capped():
    rng = random.Random(0)
    draws = [backoff_delay(3, 0.5, 60.0, rng) for _ in range(500)]
    assert min(draws) >= 0.0 and max(draws) <= 4.0 and max(draws) > 3.0 and min(draws) < 1.0
    assert all(backoff_delay(20, 1.0, 2.0, rng) <= 2.0 for _ in range(100))


def test_data_url_round_trip_matches_server_decoding(server):
    # the server recognises images by the sha256 of what the teacher sends
    teacher = OpenAITeacher(config(server, max_pixels=None))
    [message] = [m for m in teacher.build_messages(request("a")) if m["role"] == "user"]
    url = message["content"][0]["image_url"]["url"]
    assert base64.b64decode(url.split(",", 1)[1]) == SMALL
