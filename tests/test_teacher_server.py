"""The fake OpenAI-compatible server itself: recognition, counters, fault draws, process mode."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest
from PIL import Image

from pipeline.synthesis.teachers.base import (
    TeacherConfig,
    TeacherError,
    TeacherRequest,
    TeacherResponse,
)
from pipeline.synthesis.teachers.openai_backend import OpenAITeacher
from tests.support.teacher_server import TeacherServer, fixed_responder, records_to_json

ROOT = Path(__file__).resolve().parent.parent


def png(width: int, height: int, color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def request(tag: str, image: bytes, stage: str = "describe") -> TeacherRequest:
    return TeacherRequest(
        key=tag, stage=stage, images=[image], sampling={"max_tokens": 16}, record={},
        messages=[{"role": "user", "content": [
            {"type": "image", "index": 0},
            {"type": "text", "text": f"Look at this.\n## Task: {stage}\nrequest {tag}"}]}])


def teacher(server: TeacherServer, **overrides) -> OpenAITeacher:
    values = {"backend": "openai", "model": "m", "base_url": server.base_url, "max_retries": 0,
              "backoff_base_s": 0.001, "backoff_max_s": 0.01, "timeout_s": 5.0}
    return OpenAITeacher(TeacherConfig(**{**values, **overrides}))


def generate(t: OpenAITeacher, requests: list[TeacherRequest]):
    return asyncio.run(t.agenerate(requests))


def test_recognises_stage_and_record_even_after_resizing():
    calls = []

    def spy(call):
        calls.append(call)
        return f"{call.stage}:{call.record['id'] if call.record else None}"

    seed = {"id": "seed-1", "images": [{"bytes": png(300, 200, "navy")}]}
    with TeacherServer(spy, register_max_pixels=(None, 5_000)) as server:
        server.register([seed])
        t = teacher(server, max_pixels=5_000)  # the teacher sends a downscaled copy
        first, second, stranger = generate(t, [
            request("a", seed["images"][0]["bytes"], "describe"),
            request("b", seed["images"][0]["bytes"], "reason"),
            request("c", png(10, 10, "red"), "anchor")])
    assert isinstance(first, TeacherResponse) and first.text in ("describe:seed-1",)
    assert second.text == "reason:seed-1" and stranger.text == "anchor:None"
    by_tag = {c.messages[0]["content"][-1]["text"][-1]: c for c in calls}
    assert by_tag["a"].images[0] != seed["images"][0]["bytes"]  # it was resized
    assert by_tag["a"].sampling["max_tokens"] == 16


def test_earlier_stage_answers_reach_later_stages():
    records = []

    def spy(call):
        records.append(call.record)
        return f"text of {call.stage}"

    image = png(20, 20, "teal")
    with TeacherServer(spy) as server:
        server.register([{"id": "s", "images": [{"bytes": image}]}])
        generate(teacher(server), [request("a", image, "describe")])
        generate(teacher(server), [request("b", image, "reason")])
    assert records[0]["stages"] == {}
    assert records[1]["stages"] == {"describe": {"text": "text of describe"}}


def test_success_counts_and_duplicates():
    image = png(8, 8, "black")
    with TeacherServer(fixed_responder("ok")) as server:
        server.script("500")
        failed, = generate(teacher(server), [request("a", image)])
        assert isinstance(failed, TeacherError)
        assert not server.duplicates()  # a failed try is not a success
        generate(teacher(server), [request("a", image)])
        assert not server.duplicates()
        generate(teacher(server), [request("a", image)])
        [count] = server.duplicates().values()
        assert count == 2 and server.stats()["successes"] == 2 and server.total_requests == 3
        server.reset_counters()
        assert server.total_requests == 0 and not server.success_counts


def test_fault_draws_are_reproducible_per_request():
    images = [png(4, 4, c) for c in ("red", "green", "blue")]
    requests = [request(f"r{i}", images[i % 3]) for i in range(40)]

    def outcomes(seed: int, order: list[TeacherRequest]) -> dict[str, str]:
        with TeacherServer(fixed_responder("ok"), seed=seed, fault_rates={"503": 0.5}) as server:
            generate(teacher(server, max_concurrency=8), order)
            return {c.key: c.outcome for c in server.calls}

    first = outcomes(1, requests)
    assert outcomes(1, list(reversed(requests))) == first  # arrival order does not matter
    assert outcomes(2, requests) != first
    assert 5 < sum(o == "503" for o in first.values()) < 35


def test_bad_configuration_is_refused():
    server = TeacherServer(fixed_responder("ok"))
    with pytest.raises(ValueError, match="unknown fault"):
        server.faults({"404": 0.1})
    with pytest.raises(ValueError, match="sum to"):
        server.faults({"500": 0.7, "429": 0.7})
    with pytest.raises(ValueError, match="unknown scripted outcome"):
        server.script("ok", "teapot")


def test_models_endpoint_and_bad_bodies():
    with TeacherServer(fixed_responder("ok")) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        assert next(m.id for m in client.models.list()) == "avar-test-teacher"
        with pytest.raises(openai.BadRequestError, match="not a base64 data URL"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}])
        client.close()


def test_process_mode_register_stats_and_kill(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.teacher_server", "--port", "0",
                             "--fixed-text", "from a process", "--fault", "500=0.0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        base_url = line.split()[-1]
        image = png(12, 12, "purple")
        body = json.dumps({"records": records_to_json([{"id": "p", "images": [{"bytes": image}]}])})
        admin = base_url.removesuffix("/v1") + "/admin"
        with urllib.request.urlopen(urllib.request.Request(
                f"{admin}/register", data=body.encode(), method="POST")) as response:
            assert json.load(response) == {"registered": 1}
        t = OpenAITeacher(TeacherConfig(backend="openai", model="m", base_url=base_url))
        [result] = generate(t, [request("a", image)])
        assert isinstance(result, TeacherResponse) and result.text == "from a process"
        with urllib.request.urlopen(f"{admin}/stats") as response:
            stats = json.load(response)
        assert stats["total_requests"] == 1 and stats["successes"] == 1 and not stats["duplicates"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def test_default_responder_is_the_programmatic_teacher():
    programmatic = pytest.importorskip("pipeline.synthesis.teachers.programmatic")
    procedural = pytest.importorskip("pipeline.seeds.procedural")
    seed = procedural.generate_problem("counting", seed=3, difficulty=1, image_size=320)
    image = seed["images"][0]["bytes"]
    direct_teacher = programmatic.ProgrammaticTeacher(TeacherConfig())
    with TeacherServer() as server:
        server.register([seed])
        [over_http] = generate(teacher(server), [request("a", image, "describe")])
    [direct] = asyncio.run(direct_teacher.agenerate([TeacherRequest(
        key="a", stage="describe", messages=[], images=[image], sampling={}, record=seed)]))
    assert isinstance(over_http, TeacherResponse), over_http
    assert over_http.text == direct.text


def test_rollouts_with_different_seeds_are_different_requests():
    image = png(8, 8, "gray")
    first, second = request("a", image), request("a", image)
    second.sampling = {**second.sampling, "seed": 1}
    with TeacherServer(fixed_responder("ok")) as server:
        generate(teacher(server), [first, second])
        assert len(server.success_counts) == 2 and not server.duplicates()
