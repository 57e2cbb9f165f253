"""The work store: one folder per stage of sharded parquet files, keyed by sample id.

Layout::

    <root>/<stage>/part-<ns>-<digest>.parquet   results and rejects of one batch
    <root>/.lock                                 who is writing (see :class:`StoreLock`)

A shard holds three columns: ``id``, ``kind`` ("result" | "reject") and ``payload`` (the record
as JSON, image bytes excluded) plus ``images`` (list of binary). JSON payloads keep the parquet
schema stable across heterogeneous records (scene metadata differs per problem family); the
published dataset (pipeline.publish) is the typed, viewer-ready form.

Writes are atomic (temp file in the same folder, fsync, rename): a killed write leaves at most a
dot-file that readers ignore. Results and rejects of a batch land in the same file, so one rename
commits both. Reading streams one shard at a time: memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ids import stable_hash
from pipeline.records import Reject

SHARD_GLOB = "part-*.parquet"
_ARROW_SCHEMA = pa.schema([("id", pa.string()), ("kind", pa.string()),
                           ("payload", pa.large_string()), ("images", pa.list_(pa.large_binary()))])


def _split_images(record: dict) -> tuple[dict, list[bytes]]:
    images = record.get("images") or []
    blobs = [im["bytes"] for im in images]
    meta = dict(record, images=[{k: v for k, v in im.items() if k != "bytes"} for im in images])
    return meta, blobs


def _join_images(meta: dict, blobs: list[bytes]) -> dict:
    images = meta.get("images") or []
    meta["images"] = [dict(im, bytes=blob) for im, blob in zip(images, blobs, strict=True)]
    return meta


class StageStore:
    """Results and rejects of one stage."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob(SHARD_GLOB))

    def _latest(self) -> dict[str, tuple[int, str]]:
        """id -> (index of the shard holding its newest entry, kind). Reads only two columns."""
        latest: dict[str, tuple[int, str]] = {}
        for i, shard in enumerate(self.shards()):
            table = pq.read_table(shard, columns=["id", "kind"])
            for rid, kind in zip(table.column("id").to_pylist(), table.column("kind").to_pylist(), strict=True):
                latest[rid] = (i, kind)
        return latest

    def done_ids(self, retry_reasons: Iterable[str] = ()) -> set[str]:
        """Ids with a result or a final reject in this stage (reads only the id/kind columns).

        Ids whose newest entry is a reject with a reason in ``retry_reasons`` (transient teacher
        failures) are not done: a re-run tries them again, and the newer entry supersedes the reject.
        """
        retry = set(retry_reasons)
        if not retry:
            done: set[str] = set()
            for shard in self.shards():
                done.update(pq.read_table(shard, columns=["id"]).column("id").to_pylist())
            return done
        retryable = {rej["id"] for rej in self.iter_rejects() if rej.get("reason") in retry}
        return set(self._latest()) - retryable

    def write(self, results: Iterable[dict], rejects: Iterable[Reject | dict] = ()) -> Path | None:
        """Atomically write one shard with these results and rejects. Returns its path."""
        rows = {"id": [], "kind": [], "payload": [], "images": []}
        for rec in results:
            meta, blobs = _split_images(rec)
            rows["id"].append(rec["id"])
            rows["kind"].append("result")
            rows["payload"].append(json.dumps(meta, ensure_ascii=False, default=str))
            rows["images"].append(blobs)
        for rej in rejects:
            d = rej.to_dict() if isinstance(rej, Reject) else dict(rej)
            rows["id"].append(d["id"])
            rows["kind"].append("reject")
            rows["payload"].append(json.dumps(d, ensure_ascii=False))
            rows["images"].append([])
        if not rows["id"]:
            return None
        digest = stable_hash(sorted(zip(rows["id"], rows["kind"])))[:16]
        final = self.dir / f"part-{time.time_ns():020d}-{digest}.parquet"
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        try:
            table = pa.Table.from_pydict(rows, schema=_ARROW_SCHEMA)
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def _iter(self, kind: str, columns: list[str]) -> Iterator[dict]:
        # Only an id's newest entry counts (a retried transient reject is superseded).
        latest = self._latest()
        for i, shard in enumerate(self.shards()):
            frame = pl.read_parquet(shard, columns=["id", *columns]).filter(pl.col("kind") == kind)
            for row in frame.iter_rows(named=True):
                if latest.get(row["id"], (i,))[0] != i:
                    continue
                meta = json.loads(row["payload"])
                yield _join_images(meta, row["images"]) if kind == "result" else meta

    def iter_records(self) -> Iterator[dict]:
        """Stream results shard by shard (images re-attached as bytes)."""
        return self._iter("result", ["kind", "payload", "images"])

    def iter_rejects(self) -> Iterator[dict]:
        return self._iter("reject", ["kind", "payload"])

    def counts(self) -> dict[str, int]:
        out = {"result": 0, "reject": 0}
        for _, kind in self._latest().values():
            out[kind] += 1
        return out

    def reject_reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rej in self.iter_rejects():
            out[rej["reason"]] = out.get(rej["reason"], 0) + 1
        return dict(sorted(out.items()))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreLocked(RuntimeError):
    pass


class StoreLock:
    """Exclusive writer lock on a store (``<root>/.lock``) with stale-lock recovery.

    A lock whose owner process is gone (same host, dead pid) is stale and is taken over; a live
    owner makes the second run refuse with a message naming the owner.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / ".lock"
        self.held = False

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # cannot check another host's pid: respect its lock
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError):
            return True
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # half-written by a process killed mid-write
                    time.sleep(0.05)
                    owner = self._owner()
                if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == me["host"]:
                    self.held = True  # re-entrant within one process
                    return
                if owner is None or not self._alive(owner):
                    self.path.unlink(missing_ok=True)  # stale: its owner died
                    continue
                raise StoreLocked(
                    f"work store {self.path.parent} is in use by pid {owner.get('pid')} on "
                    f"{owner.get('host')} since {time.ctime(owner.get('since', 0))}; wait for it "
                    f"to finish, or delete {self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise StoreLocked(f"could not take {self.path}")

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


class WorkStore:
    """All stages of one synthesis run under one root folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def stage(self, name: str) -> StageStore:
        return StageStore(self.root, name)

    @contextmanager
    def locked(self):
        lock = StoreLock(self.root)
        lock.acquire()
        try:
            yield self
        finally:
            lock.release()
