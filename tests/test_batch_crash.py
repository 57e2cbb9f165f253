"""kill -9 of a batch run at the worst moments of submit, poll and download, then a re-run: the
records of an uninterrupted run, each file uploaded once, each request in one batch, each
request paid once.

The process (tests/support/batch_child.py) runs describe, reason and anchor of
configs/ci_small.yaml in ``mode: batch`` through the flow's shard functions against the test
server's Batch API. It is killed with SIGKILL

1. while the server holds the answer to an upload it has stored (the client never learns the
   file id),
2. while the server holds the answer to a batch it has created (nor the batch id),
3. while a batch is in progress (polling),
4. while the server holds an output file's content (downloading),
5. and 6. at random moments (seeded),

and run again each time; the last run goes to the end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.flows import PYTHON, REPO, flow_env
from tests.support.reliability import TEACHER_STAGES, openai_overrides, seed_records
from tests.support.teacher_server import TeacherServer

pytestmark = pytest.mark.slow
KILL_SEED = 5


def overrides(store: Path, base_url: str) -> list[str]:
    out = [f"run.store_dir={store}", "seeds.image_size=320", *openai_overrides(base_url, max_retries=3)]
    for stage in TEACHER_STAGES:
        out += [f"stages.{stage}.teacher.mode=batch", f"stages.{stage}.teacher.batch.poll_initial_s=0.05",
                f"stages.{stage}.teacher.batch.poll_max_s=0.1"]
    return out


def spawn(out: Path, settings: list[str], log: Path) -> subprocess.Popen:
    args = [PYTHON, "-m", "tests.support.batch_child", str(out)]
    for item in settings:
        args += ["--set", item]
    with open(log, "a") as handle:
        return subprocess.Popen(args, cwd=REPO, env=flow_env(log.parent / "prefect"), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, child: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert child.poll() is None, f"the run ended (rc {child.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def wait_for_point(point: str, child: subprocess.Popen, batches, rng: random.Random) -> None:
    """Return at the moment to kill ``child``: a held call, a batch half done, a random delay."""
    if point == "poll":
        known = len(batches.batches)  # a batch of this run, not an earlier one
        wait_for(lambda: any(b.status == "in_progress" and 0 < len(b.done) < len(b.lines)
                             for b in list(batches.batches.values())[known - 1 if known else 0:]),
                 child, "a batch in progress")
    elif point == "random":
        deadline = time.monotonic() + rng.uniform(1.0, 4.0)
        wait_for(lambda: time.monotonic() > deadline or child.poll() is not None, child, "the delay")
    else:
        wait_for(lambda: batches.holding[point] > 0, child, f"a held {point}")


def kill_9(child: subprocess.Popen) -> None:
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)


def finish(out: Path, settings: list[str], log: Path) -> dict:
    child = spawn(out, settings, log)
    assert child.wait(timeout=300) == 0, log.read_text()[-4000:]
    return json.loads(out.read_text())


def test_kill_9_during_submit_poll_and_download_then_rerun_pays_each_request_once(tmp_path):
    seeds = seed_records(["seeds.image_size=320"])
    n = len(seeds)

    with TeacherServer() as server:  # the uninterrupted reference
        server.register(seeds)
        reference = finish(tmp_path / "reference.json", overrides(tmp_path / "ref", server.base_url),
                           tmp_path / "reference.log")
    assert len(reference) == n and all(len(stages) == 3 for stages in reference.values())

    log, out = tmp_path / "crashed.log", tmp_path / "crashed.json"
    rng = random.Random(KILL_SEED)
    killed_at = []
    with TeacherServer() as server:
        server.register(seeds)
        server.batches.behaviour.lines_per_poll = 2
        settings = overrides(tmp_path / "store", server.base_url)
        batches = server.batches
        for point in ("upload", "create", "poll", "content", "random", "random"):
            if point in ("upload", "create", "content"):
                batches.hold(point)
            child = spawn(out, settings, log)
            wait_for_point(point, child, batches, rng)
            if child.poll() is None:
                kill_9(child)
            batches.release()
            deadline = time.monotonic() + 10
            while sum(batches.holding.values()) and time.monotonic() < deadline:
                time.sleep(0.01)  # the held handlers answer the dead client and are done
            killed_at.append(f"{point} (batches so far {len(batches.batches)}, answered {len(server.success_counts)})")
        result = finish(out, settings, log)
        assert batches.calls["list_files"] >= 1 and batches.calls["list_batches"] >= 1  # found, not redone
        uploads = batches.input_uploads()
        per_request = batches.lines_submitted()
        per_file = dict(batches.batches_by_file)
        assert not server.duplicates(), f"requests paid twice: {server.duplicates()} ({killed_at})"
        assert sum(server.success_counts.values()) == 3 * n
    assert result == reference, f"records differ from the uninterrupted run (kills: {killed_at})"
    assert all(count == 1 for count in uploads.values()), f"a file was uploaded twice: {uploads}"
    assert all(count == 1 for count in per_file.values()), f"a file got two batches: {per_file}"
    assert all(count == 1 for count in per_request.values()) and len(per_request) == 3 * n
