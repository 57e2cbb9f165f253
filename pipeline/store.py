"""The work store: one folder per stage of sharded parquet files, keyed by sample id.

Layout::

    <root>/<stage>/shard-<k>-of-<n>/part-<ns>-<digest>.parquet   partition k of n (by id hash)
    <root>/<stage>/part-<ns>-<digest>.parquet                     unpartitioned (the filter)
    <root>/.lock                                                  who is writing (StoreLock)

A file holds the results and rejects of one batch: columns ``id``, ``kind`` ("result" |
"reject"), ``payload`` (the record as JSON, image bytes excluded) and ``images`` (list of
binary). JSON payloads keep the parquet schema stable across heterogeneous records (scene
metadata differs per problem family); the published dataset (pipeline.publishing) is the typed,
viewer-ready form.

Records are partitioned by :func:`shard_of` their id, so the task for partition k of a stage
reads only partition k of its input stage: every stage reads its input once, whatever the number
of partitions. Files written under another partition count (``run.n_shards`` changed between
runs) or unpartitioned stay readable: a partition's reads include them, filtered by id.

Writes are atomic and durable (:mod:`pipeline.atomic`): a killed write leaves at most a dot-file
that readers ignore, and one rename commits a batch's results and rejects together. An id's
newest entry (by file name, which starts with the write time) supersedes older ones, so a
retried transient reject is replaced by its result. Reading streams one file at a time: memory
does not grow with the dataset. No module outside this one reads the store's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_file
from pipeline.errors import PermanentError
from pipeline.ids import stable_hash
from pipeline.records import Reject

SHARD_GLOB = "part-*.parquet"
_PARTITION_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")
_ARROW_SCHEMA = pa.schema([("id", pa.string()), ("kind", pa.string()),
                           ("payload", pa.large_string()), ("images", pa.list_(pa.large_binary()))])


def shard_of(sample_id: str, n_shards: int) -> int:
    """The partition of an id: a hash of it, stable across runs whatever order ids arrive in.

    Sample ids are content hashes already (their first 32 bits are used); any other id (the
    reject of a row that never became a record, ``<source>:row<k>``) is hashed first.
    """
    head = sample_id[:8]
    if len(head) < 8 or not all(c in "0123456789abcdef" for c in head):
        head = hashlib.sha256(sample_id.encode("utf-8")).hexdigest()[:8]
    return int(head, 16) % n_shards


@dataclass(frozen=True)
class Partition:
    """Partition ``index`` of ``count`` (records with ``shard_of(id, count) == index``)."""

    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index} out of range for {self.count} partitions")

    @property
    def dirname(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def holds(self, sample_id: str) -> bool:
        return shard_of(sample_id, self.count) == self.index


def _split_images(record: dict) -> tuple[dict, list[bytes]]:
    images = record.get("images") or []
    blobs = [im["bytes"] for im in images]
    meta = dict(record, images=[{k: v for k, v in im.items() if k != "bytes"} for im in images])
    return meta, blobs


def _join_images(meta: dict, blobs: list[bytes]) -> dict:
    images = meta.get("images") or []
    meta["images"] = [dict(im, bytes=blob) for im, blob in zip(images, blobs, strict=True)]
    return meta


@dataclass(frozen=True)
class _Source:
    """One file to read, and whether only some of its ids belong to the partition being read."""

    path: Path
    only: Partition | None = None

    def rows(self, columns: list[str], ids: set[str] | None) -> Iterator[dict]:
        table = pq.read_table(self.path, columns=columns)
        for row in table.to_pylist():
            if self.only is not None and not self.only.holds(row["id"]):
                continue
            if ids is not None and row["id"] not in ids:
                continue
            yield row


def is_stage_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a work-store stage folder (holds data files, in partitions or not)."""
    path = Path(path)
    return path.is_dir() and (any(path.glob(SHARD_GLOB)) or any(
        _PARTITION_RE.match(p.name) and any(p.glob(SHARD_GLOB)) for p in path.iterdir() if p.is_dir()))


class StageStore:
    """Results and rejects of one stage.

    Every reading method takes an optional ``partition``: None reads the whole stage.
    """

    def __init__(self, root: Path, name: str):
        self.name = name
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- files --------------------------------------------------------------------------------

    def shards(self) -> list[Path]:
        """Every data file of the stage (all partitions), oldest first."""
        return [s.path for s in self._sources(None)]

    def _sources(self, partition: Partition | None) -> list[_Source]:
        found: list[_Source] = []
        for path in self.dir.glob(SHARD_GLOB):
            found.append(_Source(path, partition))
        for folder in self.dir.iterdir():
            m = _PARTITION_RE.match(folder.name)
            if not (m and folder.is_dir()):
                continue
            own = partition is None or (int(m.group(1)), int(m.group(2))) == (partition.index, partition.count)
            if partition is not None and not own and int(m.group(2)) == partition.count:
                continue  # another partition of the same layout: none of its ids are ours
            for path in folder.glob(SHARD_GLOB):
                found.append(_Source(path, None if own else partition))
        return sorted(found, key=lambda s: s.path.name)

    def write(self, results: Iterable[dict], rejects: Iterable[Reject | dict] = (),
              partition: Partition | None = None) -> Path | None:
        """Atomically write one file with these results and rejects. Returns its path."""
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
        if partition is not None:
            strays = [rid for rid in rows["id"] if not partition.holds(rid)]
            if strays:
                raise ValueError(f"stage {self.name}: id {strays[0]} does not belong to partition "
                                 f"{partition.index} of {partition.count}")
        digest = stable_hash(sorted(zip(rows["id"], rows["kind"])))[:16]
        folder = self.dir / partition.dirname if partition is not None else self.dir
        final = folder / f"part-{time.time_ns():020d}-{digest}.parquet"
        table = pa.Table.from_pydict(rows, schema=_ARROW_SCHEMA)
        with atomic_file(final, durable=True) as fh:
            pq.write_table(table, fh, compression="zstd")
        return final

    # -- reading ------------------------------------------------------------------------------

    def _latest(self, partition: Partition | None = None) -> dict[str, tuple[int, str]]:
        """id -> (index of the source holding its newest entry, kind). Reads two columns."""
        latest: dict[str, tuple[int, str]] = {}
        for i, source in enumerate(self._sources(partition)):
            for row in source.rows(["id", "kind"], None):
                latest[row["id"]] = (i, row["kind"])
        return latest

    def ids(self, kind: str = "result", partition: Partition | None = None) -> set[str]:
        """Ids whose newest entry is of ``kind`` ("result" or "reject")."""
        return {rid for rid, (_, k) in self._latest(partition).items() if k == kind}

    def done_ids(self, retry_reasons: Iterable[str] = (), partition: Partition | None = None) -> set[str]:
        """Ids with a result or a final reject (reads only the id/kind columns).

        Ids whose newest entry is a reject with a reason in ``retry_reasons`` (transient teacher
        failures) are not done: a re-run tries them again, and the newer entry supersedes the reject.
        """
        latest = self._latest(partition)
        retry = set(retry_reasons)
        if not retry:
            return set(latest)
        retryable = {rej["id"] for rej in self.iter_rejects(partition) if rej.get("reason") in retry}
        return set(latest) - retryable

    def _iter(self, kind: str, partition: Partition | None, ids: Iterable[str] | None) -> Iterator[dict]:
        latest = self._latest(partition)  # only an id's newest entry counts
        wanted = set(ids) if ids is not None else None
        needed = None if wanted is None else {latest[rid][0] for rid in wanted if rid in latest}
        columns = ["id", "kind", "payload"] + (["images"] if kind == "result" else [])
        for i, source in enumerate(self._sources(partition)):
            if needed is not None and i not in needed:
                continue
            for row in source.rows(columns, wanted):
                if row["kind"] != kind or latest.get(row["id"], (i,))[0] != i:
                    continue
                meta = json.loads(row["payload"])
                yield _join_images(meta, row["images"]) if kind == "result" else meta

    def iter_records(self, partition: Partition | None = None,
                     ids: Iterable[str] | None = None) -> Iterator[dict]:
        """Stream results file by file (images re-attached as bytes); optionally only ``ids``."""
        return self._iter("result", partition, ids)

    def iter_rejects(self, partition: Partition | None = None) -> Iterator[dict]:
        return self._iter("reject", partition, None)

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


class StoreLocked(RuntimeError, PermanentError):
    """Another live process is writing to this store."""


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
