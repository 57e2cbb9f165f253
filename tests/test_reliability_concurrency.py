"""Two runs on one work store: the second refuses while the first lives; a stale lock is recovered.

- store level (fast): a process holding ``WorkStore.locked()`` makes a second process refuse
  with a message naming the owner; after a ``kill -9`` of the owner the lock is stale and is
  taken over. Two processes writing shards into one stage at the same time never produce an
  unreadable or interleaved shard (atomic rename).
- flow level (slow): ``python -m flows.synth`` twice on the same store: the second run refuses
  while the first is parked in the describe stage (its teacher requests are held by the test
  server), nothing it could have written appears in the store; after the first is killed with
  SIGKILL a new run recovers the stale lock and completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from pipeline.store import StoreLocked, WorkStore
from tests.support.reliability import (
    REPO,
    STORE_STAGES,
    HoldingResponder,
    PrefectServer,
    flow_command,
    flow_env,
    kill_9,
    openai_overrides,
    output_overrides,
    published_rows,
    seed_records,
    spawn_flow,
    stage_ids,
    stop_process,
    wait_until,
)
from tests.support.teacher_server import TeacherServer

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pipeline.store import WorkStore
    with WorkStore(sys.argv[1]).locked():
        print("locked", flush=True)
        time.sleep(600)
""")

WRITE_SHARDS = textwrap.dedent("""
    import sys
    from pipeline.store import WorkStore
    stage = WorkStore(sys.argv[1]).stage("describe")
    tag = sys.argv[2]
    for i in range(int(sys.argv[3])):
        stage.write([{"id": f"{tag}-{i:04d}-{j}", "payload_text": "x" * 2000 * j} for j in range(8)])
""")


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), **kwargs)


def test_second_holder_refuses_then_recovers_a_stale_lock(tmp_path):
    owner = python(HOLD_LOCK, str(tmp_path), stdout=subprocess.PIPE)
    try:
        assert owner.stdout.readline().strip() == "locked"
        refused = pytest.raises(StoreLocked, match=rf"in use by pid {owner.pid} .*delete .*\.lock")
        with refused, WorkStore(tmp_path).locked():
            pass
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
    finally:
        stop_process(owner)
    lock = tmp_path / ".lock"
    assert json.loads(lock.read_text())["pid"] == owner.pid  # left behind by the dead owner
    with WorkStore(tmp_path).locked():  # stale: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_half_written_lock_file_is_recovered(tmp_path):
    (tmp_path / ".lock").write_text('{"pid": 12')  # owner killed in the middle of writing it
    with WorkStore(tmp_path).locked():
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_concurrent_shard_writers_never_interleave(tmp_path):
    writers = [python(WRITE_SHARDS, str(tmp_path), tag, "40") for tag in ("a", "b")]
    for proc in writers:
        assert proc.wait(timeout=120) == 0
    stage = WorkStore(tmp_path).stage("describe")
    shards = stage.shards()
    assert len(shards) == 80
    for shard in shards:  # every shard is whole and belongs to one writer
        ids = pq.read_table(shard, columns=["id"]).column("id").to_pylist()
        assert len(ids) == 8 and len({i.split("-")[0] for i in ids}) == 1, shard.name
    assert len(stage.done_ids()) == 640
    assert not [p for p in (tmp_path / "describe").iterdir() if p.name.startswith(".")]


def store_files(store) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_second_flow_refuses_while_the_first_runs_and_a_new_run_recovers_after_kill_9(tmp_path):
    with PrefectServer(tmp_path / "prefect") as prefect:
        env = flow_env(tmp_path / "prefect_home", prefect.api_url)
        responder = HoldingResponder()
        responder.hold()  # the first run parks in describe, holding the store lock
        store = tmp_path / "run" / "store"
        log = tmp_path / "flows.log"
        with TeacherServer(responder) as server:
            overrides = (["seeds.image_size=320"] + output_overrides(tmp_path / "run")
                         + openai_overrides(server.base_url))
            server.register(seed_records(overrides))
            first = spawn_flow(overrides, env, log)
            try:
                wait_until(lambda: responder.held > 0, 300, "the first run to reach describe", alive=first)
                assert json.loads((store / ".lock").read_text())["pid"] == first.pid
                before = store_files(store)

                second = subprocess.run(flow_command(overrides), check=False, cwd=REPO, env=env, capture_output=True,
                                        text=True, timeout=300)
                output = second.stdout + second.stderr
                assert second.returncode != 0, output[-3000:]
                assert f"is in use by pid {first.pid}" in output, output[-3000:]
                assert first.poll() is None
                assert store_files(store) == before, "the refused run wrote into the store"
            finally:
                kill_9(first)
                responder.fail_held()
            assert json.loads((store / ".lock").read_text())["pid"] == first.pid  # stale now

            third = subprocess.run(flow_command(overrides), check=False, cwd=REPO, env=env, capture_output=True,
                                   text=True, timeout=400)
            assert third.returncode == 0, (third.stdout + third.stderr)[-4000:]
            assert not server.duplicates()
        assert not (store / ".lock").exists()
        rows = published_rows(tmp_path / "run" / "published")
        assert len(rows) >= 5
        for stage in STORE_STAGES:
            ids = stage_ids(store, stage)
            assert ids and len(ids) == len(set(ids)), stage
        for shard in store.rglob("part-*.parquet"):
            pq.read_table(shard)  # every shard complete and readable

