import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline.executor import run_stage
from pipeline.records import Reject
from pipeline.store import StoreLock, StoreLocked, WorkStore


def rec(i, blob=b"\x89PNG-ish"):
    return {"id": f"{i:032x}", "images": [{"bytes": blob + bytes([i % 256]), "sha256": "0" * 64}],
            "question": f"q{i}", "scene": {"family": "f", "elements": [], "extra": {"i": i}}}


class Doubler:
    name = "double"

    def __init__(self):
        self.calls = 0

    def run(self, batch):
        self.calls += len(batch)
        out = []
        for r in batch:
            if int(r["id"], 16) % 5 == 0:
                out.append(Reject(r["id"], self.name, "divisible_by_five", "test reject"))
            else:
                out.append(dict(r, value=int(r["id"], 16) * 2))
        return out


def test_roundtrip_keeps_bytes_and_nested_fields(tmp_path):
    st = WorkStore(tmp_path).stage("s")
    st.write([rec(1), rec(2)], [Reject("f" * 32, "s", "bad", "msg", field="$.x")])
    got = list(st.iter_records())
    assert [g["id"] for g in got] == [rec(1)["id"], rec(2)["id"]]
    assert got[0]["images"][0]["bytes"] == rec(1)["images"][0]["bytes"]
    assert got[1]["scene"]["extra"] == {"i": 2}
    rejects = list(st.iter_rejects())
    assert rejects[0]["field"] == "$.x" and rejects[0]["reason"] == "bad"
    assert st.counts() == {"result": 2, "reject": 1}
    assert st.done_ids() == {rec(1)["id"], rec(2)["id"], "f" * 32}


def test_stage_is_idempotent(tmp_path, monkeypatch):
    from pipeline import executor
    monkeypatch.setattr(executor, "check_output", lambda name, out: out)  # toy records, no schema
    store = WorkStore(tmp_path)
    stage = Doubler()
    inputs = [rec(i) for i in range(1, 31)]
    first = run_stage(stage, store.stage("double"), inputs, shard_size=8)
    assert (first.results, first.rejects, first.shards) == (24, 6, 4)
    assert stage.calls == 30
    second = run_stage(stage, store.stage("double"), inputs, shard_size=8)
    assert stage.calls == 30, "second run must do no work"
    assert (second.skipped, second.results, second.shards) == (30, 0, 0)
    assert store.stage("double").reject_reasons() == {"divisible_by_five": 6}
    values = sorted(r["value"] for r in store.stage("double").iter_records())
    assert values == sorted(i * 2 for i in range(1, 31) if i % 5)


def test_invalid_output_becomes_reject_naming_field(tmp_path):
    class Broken:
        name = "describe"
        produces = ("stages.describe",)  # declared, but not delivered

        def run(self, batch):
            return [dict(r) for r in batch]  # forgets stages.describe

    from tests.support.samples import seed_record
    report = run_stage(Broken(), WorkStore(tmp_path).stage("describe"), [seed_record()])
    assert report.rejects == 1
    (rej,) = WorkStore(tmp_path).stage("describe").iter_rejects()
    assert rej["field"] == "$.stages.describe" and rej["reason"] == "schema_invalid"


def test_killed_write_leaves_no_visible_partial_shard(tmp_path):
    # A child process starts writing a big shard and is killed with SIGKILL mid-write.
    code = textwrap.dedent(f"""
        import os, sys
        import pyarrow.parquet as pq
        from pipeline.store import WorkStore
        real = pq.write_table
        def slow(table, fh, **kw):
            real(table, fh, **kw)
            fh.flush()
            print("WRITING", flush=True)
            import time; time.sleep(60)
        pq.write_table = slow
        st = WorkStore({str(tmp_path)!r}).stage("s")
        st.write([{{"id": f"{{i:032x}}", "images": [{{"bytes": os.urandom(1000)}}]}} for i in range(500)])
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == b"WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = WorkStore(tmp_path).stage("s")
    assert st.shards() == [] and st.done_ids() == set() and list(st.iter_records()) == []
    st.write([rec(3)])  # the store stays writable
    assert len(list(st.iter_records())) == 1


def test_lock_refuses_live_owner_and_recovers_stale(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock_file = tmp_path / ".lock"
        import json
        import socket
        lock_file.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": 0}))
        with pytest.raises(StoreLocked, match=f"pid {sleeper.pid}"):
            StoreLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = StoreLock(tmp_path)  # owner is dead now: stale lock is taken over
    lock.acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()


def test_transient_rejects_are_retried_and_superseded(tmp_path, monkeypatch):
    from pipeline import executor
    monkeypatch.setattr(executor, "check_output", lambda name, out: out)

    class Flaky:
        name = "flaky"

        def __init__(self, down):
            self.down, self.calls = down, 0

        def run(self, batch):
            self.calls += len(batch)
            return [Reject(r["id"], self.name, "teacher_timeout", "down") if self.down
                    else Reject(r["id"], self.name, "format_invalid", "bad") if r["id"].endswith("3")
                    else dict(r, ok=True) for r in batch]

    st = WorkStore(tmp_path).stage("flaky")
    inputs = [rec(i) for i in range(1, 5)]
    run_stage(Flaky(down=True), st, inputs)
    assert st.counts() == {"result": 0, "reject": 4}
    second = Flaky(down=False)
    run_stage(second, st, inputs)
    assert second.calls == 4, "transient rejects are tried again"
    assert st.counts() == {"result": 3, "reject": 1}
    assert st.reject_reasons() == {"format_invalid": 1}
    assert sorted(r["id"] for r in st.iter_records()) == sorted(r["id"] for r in inputs if not r["id"].endswith("3"))
    third = Flaky(down=True)
    run_stage(third, st, inputs)
    assert third.calls == 0, "final rejects and results are done"
