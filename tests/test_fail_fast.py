"""Fail fast: a teacher stage checks its endpoint before any work, and a circuit breaker stops it
when every request would fail, instead of turning the dataset into rejects one by one."""

from __future__ import annotations

import pytest
from prefect.states import Completed, Failed

from flows.synth import _retryable
from pipeline.configio import ConfigError
from pipeline.seeds.loader import DatasetReadError
from pipeline.synthesis.cache import RequestCache
from pipeline.synthesis.stages import DescribeStage, StageConfig
from pipeline.synthesis.teachers.base import (
    CircuitBreaker,
    TeacherConfig,
    TeacherFatalError,
    TeacherSetupError,
)
from pipeline.synthesis.teachers.openai_backend import OpenAITeacher
from tests.support.reliability import free_port
from tests.support.teacher_server import ResponderError, TeacherServer
from tests.test_stages import seed

DESCRIPTION = "A triangle; angle A is 50 degrees and angle B is 60 degrees."
TOO_LONG = ("'max_tokens' is too large: 8192. This model's maximum context length is 2048 tokens "
            "and your request has 412 input tokens")


def _teacher(base_url: str, model: str = "tiny", **kw) -> TeacherConfig:
    settings = {"max_retries": 0, "timeout_s": 10, "backoff_base_s": 0.001, "backoff_max_s": 0.002, **kw}
    return TeacherConfig(backend="openai", model=model, base_url=base_url, **settings)


def _preflight(base_url: str, model: str = "tiny", max_tokens: int = 1024) -> None:
    OpenAITeacher(_teacher(base_url, model)).preflight({"max_tokens": max_tokens}, "stages.reason.teacher")


# -- preflight ---------------------------------------------------------------------------------

def test_preflight_passes_when_the_model_is_served_and_max_tokens_fits():
    with TeacherServer(lambda call: "x", models={"tiny": 2048, "other": None}) as server:
        _preflight(server.base_url, "tiny", 2000)
        _preflight(server.base_url, "other", 10**6)  # no max_model_len reported: nothing to check
        assert server.total_requests == 0  # GET /models only, no completion


@pytest.mark.parametrize(("model", "max_tokens", "key", "says"), [
    ("tiny", 8192, "stages.reason.sampling.max_tokens", "2048"),
    ("tiny-qwen3", 1024, "stages.reason.teacher.model", "served: tiny"),
])
def test_preflight_names_the_key_to_fix(model, max_tokens, key, says):
    with TeacherServer(lambda call: "x", models={"tiny": 2048}) as server, \
            pytest.raises(TeacherSetupError) as err:
        _preflight(server.base_url, model, max_tokens)
    assert err.value.key == key and str(err.value).startswith(key) and says in str(err.value)
    assert isinstance(err.value, ConfigError)  # the flow exits 2 and Prefect does not retry


def test_preflight_of_an_unreachable_endpoint_names_base_url():
    with pytest.raises(TeacherSetupError) as err:
        _preflight(f"http://127.0.0.1:{free_port()}/v1")
    assert err.value.key == "stages.reason.teacher.base_url" and "is the server up" in str(err.value)


def test_the_stage_preflights_with_its_own_sampling():
    with TeacherServer(lambda call: "x", models={"tiny": 2048}) as server:
        config = StageConfig(teacher=_teacher(server.base_url), sampling={"max_tokens": 4096})
        with DescribeStage(config, progress=False) as stage, pytest.raises(TeacherSetupError) as err:
            stage.preflight()
    assert err.value.key == "stages.describe.sampling.max_tokens"


# -- the circuit breaker -----------------------------------------------------------------------

def test_the_breaker_counts_one_refusal_with_its_numbers_blanked():
    breaker = CircuitBreaker(3, "teacher t")
    breaker.refused("HTTP 400: you requested 2100 tokens")
    breaker.refused("HTTP 400: you requested 2300 tokens")
    breaker.success()  # an answer in between resets it
    breaker.refused("HTTP 400: you requested 2100 tokens")
    breaker.refused("HTTP 400: image too large")  # a different refusal starts over
    breaker.refused("HTTP 400: you requested 9 tokens")
    breaker.refused("HTTP 400: you requested 10 tokens")
    with pytest.raises(TeacherFatalError, match="the same refusal 3 times in a row"):
        breaker.refused("HTTP 400: you requested 11 tokens")
    assert CircuitBreaker(0, "off").refused("x") is None  # 0 = never trips


def _records(n: int) -> list[dict]:
    return [seed(i) for i in range(n)]


def test_a_repeated_refusal_stops_the_stage_and_a_rerun_after_the_fix_continues(tmp_path):
    broken = {"on": False}
    answered_before = 3

    def reply(call):
        if broken["on"]:
            raise ResponderError(400, TOO_LONG)
        return DESCRIPTION

    records = _records(40)
    cache = RequestCache(tmp_path / "cache.sqlite")
    with TeacherServer(reply) as server:
        server.register(records)
        config = StageConfig(teacher=_teacher(server.base_url, breaker_after=5, max_concurrency=2))
        with DescribeStage(config, cache=cache, progress=False) as stage:
            done = stage.run(records[:answered_before])
        assert all("stages" in r for r in done)
        broken["on"] = True
        with DescribeStage(config, cache=cache, progress=False) as stage, \
                pytest.raises(TeacherFatalError, match="the same refusal 5 times in a row") as err:
            stage.run(records)
        assert "maximum context length" in str(err.value)
        # stopped after about breaker_after refusals (plus those already in flight), not 37
        refused = server.stats()["outcomes"].get("ok", 0) - answered_before
        assert 5 <= refused <= 5 + 2, server.stats()
        broken["on"] = False
        server.reset_counters()
        with DescribeStage(config, cache=cache, progress=False) as stage:
            out = stage.run(records)
    assert len(out) == 40 and all(r["stages"]["describe"]["text"] == DESCRIPTION for r in out)
    # the three answered before were served from the cache; refusals were never cached
    assert server.total_requests == 40 - answered_before
    assert sum(r["stages"]["describe"]["cached"] for r in out) == answered_before


def test_a_server_that_goes_away_stops_the_stage(tmp_path):
    port = free_port()
    records = _records(30)
    cache = RequestCache(tmp_path / "cache.sqlite")
    config = StageConfig(teacher=_teacher(f"http://127.0.0.1:{port}/v1", breaker_after=4, max_retries=1))
    with TeacherServer(lambda call: DESCRIPTION, port=port) as server:
        server.register(records)
        with DescribeStage(config, cache=cache, progress=False) as stage:
            stage.run(records[:2])
    with DescribeStage(config, cache=cache, progress=False) as stage, \
            pytest.raises(TeacherFatalError, match="could not connect"):  # the server is gone
        stage.run(records)
    with TeacherServer(lambda call: DESCRIPTION, port=port) as server:  # back up: the rest goes on
        server.register(records)
        with DescribeStage(config, cache=cache, progress=False) as stage:
            out = stage.run(records)
        assert server.total_requests == 28
    assert len(out) == 30


# -- Prefect retries only what may succeed the next time ---------------------------------------

@pytest.mark.parametrize(("error", "retried"), [
    (DatasetReadError("seeds: cannot read rows"), False),
    (TeacherFatalError("the same refusal 20 times in a row"), False),
    (TeacherSetupError("stages.reason.teacher.model", "not served"), False),
    (ValueError("a bug repeats"), False),
    (ConnectionResetError("lost"), True),
    (TimeoutError(), True),
])
def test_prefect_retries_only_transient_failures(error, retried):
    assert _retryable(None, None, Failed(data=error)) is retried
    assert _retryable(None, None, Completed()) is True
