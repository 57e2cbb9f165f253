"""Where every batch job stands, in the run's SQLite (the request cache's file).

A *job* is one JSONL input file and the batch made from it. Its row carries the file id, the
batch id, the provider's status and counts, and the ``custom_id`` of each request it carries
(with the line's place in the local file, so a line can be resubmitted without rebuilding it).
The runner (:mod:`pipeline.synthesis.batch.runner`) writes what it is about to do *before*
each call that changes something at the provider (``uploading``, ``submitting``, ``downloading``,
a cancel request) and what came back right *after* it, each in one transaction, so a process
killed at any instant leaves a row that says which call may have happened and how to find out
(a file by its unique name, a batch by its metadata).

Job phases (column ``status``): ``prepared`` -> ``uploading`` -> ``uploaded`` -> ``submitting``
-> the provider's ``validating`` / ``in_progress`` / ``finalizing`` / ``cancelling`` -> its
``completed`` / ``expired`` / ``cancelled`` / ``failed`` -> ``downloading`` -> ``collected``.
Everything before ``collected`` is *open*: a request in an open job is never put in another one.

Hand-written SQL rather than an ORM: two small tables in a file the request cache already owns.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.synthesis.cache import retry_locked

PENDING_REMOTE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL_REMOTE = ("completed", "expired", "cancelled", "failed")
SUBMITTED = PENDING_REMOTE + TERMINAL_REMOTE + ("downloading",)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_jobs (
    uid TEXT PRIMARY KEY, stage TEXT NOT NULL, shard INTEGER, model TEXT NOT NULL,
    endpoint TEXT NOT NULL, run TEXT, config TEXT, status TEXT NOT NULL, remote_status TEXT,
    input_path TEXT, n_requests INTEGER NOT NULL, n_bytes INTEGER NOT NULL,
    est_tokens INTEGER NOT NULL, file_id TEXT, batch_id TEXT, output_file_id TEXT,
    error_file_id TEXT, total INTEGER DEFAULT 0, completed INTEGER DEFAULT 0,
    failed INTEGER DEFAULT 0, cancel_requested INTEGER DEFAULT 0, error TEXT,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batch_lines (
    uid TEXT NOT NULL, custom_id TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    outcome TEXT, PRIMARY KEY (uid, custom_id));
CREATE INDEX IF NOT EXISTS batch_lines_custom_id ON batch_lines (custom_id);
CREATE INDEX IF NOT EXISTS batch_jobs_stage ON batch_jobs (stage, status);
"""


@dataclass
class Job:
    """One row of ``batch_jobs`` (see the module docstring for ``status``)."""

    uid: str
    stage: str
    shard: int | None
    model: str
    endpoint: str  # the provider's base URL, or "vllm-offline"
    run: str | None
    config: str | None
    status: str
    remote_status: str | None
    input_path: str | None
    n_requests: int
    n_bytes: int
    est_tokens: int
    file_id: str | None = None
    batch_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancel_requested: int = 0
    error: str | None = None
    created: float = 0.0
    updated: float = 0.0

    @property
    def filename(self) -> str:
        """The input file's name at the provider: unique per job, so an upload whose answer was
        lost is found again by it."""
        return f"avar-{self.stage}-{self.uid}.jsonl"

    def progress(self) -> str:
        """What a person reads: ``in progress 40/64``, ``finalizing``, ``completed``."""
        status = (self.status if self.status != "collected" else self.remote_status) or self.status
        shown = status.replace("_", " ")
        if status in ("in_progress", "cancelling") and self.total:
            shown += f" {self.completed + self.failed}/{self.total}"
        return shown


@dataclass
class BatchScope:
    """What a stage's batches are labelled with (their metadata and state rows)."""

    run: str = ""
    config: str = ""


@dataclass
class LineRef:
    """A request in a job: its ``custom_id`` (the request-cache key) and where its line is."""

    custom_id: str
    offset: int
    length: int
    outcome: str | None = None  # None while open; ok | retry | final after collection


_JOB_COLUMNS = [f.name for f in fields(Job)]


class BatchState:
    """The two batch tables of one SQLite file; one connection per thread (like the cache)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        con = self._conn()
        retry_locked(lambda: con.executescript(_SCHEMA))

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            retry_locked(lambda: con.execute("PRAGMA journal_mode=WAL"))
            con.execute("PRAGMA synchronous=FULL")  # a job row must survive a power cut
            self._local.con = con
        return con

    def _transaction(self, statements: Iterable[tuple[str, tuple | list]]) -> None:
        con = self._conn()
        retry_locked(lambda: con.execute("BEGIN IMMEDIATE"))
        try:
            for sql, args in statements:
                if isinstance(args, list):
                    con.executemany(sql, args)
                else:
                    con.execute(sql, args)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    # -- writing -----------------------------------------------------------------------------

    def add_job(self, job: Job, lines: list[LineRef]) -> None:
        """A new job and its lines, in one transaction (its file is already on disk)."""
        job.created = job.updated = time.time()
        marks = ",".join("?" * len(_JOB_COLUMNS))
        self._transaction([
            (f"INSERT INTO batch_jobs ({','.join(_JOB_COLUMNS)}) VALUES ({marks})",
             tuple(getattr(job, c) for c in _JOB_COLUMNS)),
            ("INSERT INTO batch_lines (uid, custom_id, offset, length) VALUES (?, ?, ?, ?)",
             [(job.uid, line.custom_id, line.offset, line.length) for line in lines])])

    def update(self, job: Job, **values) -> Job:
        """Set columns of ``job`` (and the object), committed before this returns."""
        values["updated"] = time.time()
        for name, value in values.items():
            setattr(job, name, value)
        assigns = ", ".join(f"{name} = ?" for name in values)
        self._transaction([(f"UPDATE batch_jobs SET {assigns} WHERE uid = ?", (*values.values(), job.uid))])
        return job

    def collected_with(self, job: Job, outcomes: dict[str, str],
                       new_jobs: list[tuple[Job, list[LineRef]]], **values) -> None:
        """Mark ``job`` collected with its lines' outcomes and add the jobs that carry its
        resubmitted lines, in one transaction: a line is never in two open jobs, nor in none."""
        now = time.time()
        values.update(status="collected", updated=now)
        for name, value in values.items():
            setattr(job, name, value)
        assigns = ", ".join(f"{name} = ?" for name in values)
        marks = ",".join("?" * len(_JOB_COLUMNS))
        statements: list[tuple[str, tuple | list]] = [
            ("UPDATE batch_lines SET outcome = ? WHERE uid = ? AND custom_id = ?",
             [(outcome, job.uid, key) for key, outcome in outcomes.items()]),
            (f"UPDATE batch_jobs SET {assigns} WHERE uid = ?", (*values.values(), job.uid))]
        for new, lines in new_jobs:
            new.created = new.updated = now
            statements += [
                (f"INSERT INTO batch_jobs ({','.join(_JOB_COLUMNS)}) VALUES ({marks})",
                 tuple(getattr(new, c) for c in _JOB_COLUMNS)),
                ("INSERT INTO batch_lines (uid, custom_id, offset, length) VALUES (?, ?, ?, ?)",
                 [(new.uid, line.custom_id, line.offset, line.length) for line in lines])]
        self._transaction(statements)

    # -- reading -----------------------------------------------------------------------------

    def _jobs(self, where: str = "1", args: tuple = ()) -> list[Job]:
        rows = self._conn().execute(f"SELECT {','.join(_JOB_COLUMNS)} FROM batch_jobs WHERE {where} "
                                    "ORDER BY created, uid", args).fetchall()
        return [Job(*row) for row in rows]

    def job(self, uid: str) -> Job | None:
        found = self._jobs("uid = ?", (uid,))
        return found[0] if found else None

    def jobs(self, stage: str | None = None, open_only: bool = False) -> list[Job]:
        clauses, args = [], []
        if stage is not None:
            clauses.append("stage = ?")
            args.append(stage)
        if open_only:
            clauses.append("status != 'collected'")
        return self._jobs(" AND ".join(clauses) or "1", tuple(args))

    def has_jobs(self, stage: str, endpoint: str) -> bool:
        row = self._conn().execute("SELECT 1 FROM batch_jobs WHERE stage = ? AND endpoint = ? LIMIT 1",
                                   (stage, endpoint)).fetchone()
        return row is not None

    def known_batch_ids(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT batch_id FROM batch_jobs WHERE batch_id IS NOT NULL")}

    def lines(self, uid: str) -> list[LineRef]:
        rows = self._conn().execute("SELECT custom_id, offset, length, outcome FROM batch_lines "
                                    "WHERE uid = ? ORDER BY offset", (uid,)).fetchall()
        return [LineRef(*row) for row in rows]

    def open_jobs_of(self, keys: list[str]) -> dict[str, str]:
        """custom_id -> uid of the open job that carries it, for those of ``keys`` in one."""
        out: dict[str, str] = {}
        con = self._conn()
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for key, uid in con.execute(
                    f"SELECT l.custom_id, l.uid FROM batch_lines l JOIN batch_jobs j ON j.uid = l.uid "
                    f"WHERE j.status != 'collected' AND l.custom_id IN ({marks})", chunk):
                out[key] = uid
        return out

    def enqueued_tokens(self, model: str, endpoint: str) -> int:
        """Estimated tokens of this model's submitted batches the provider has not finished."""
        marks = ",".join("?" * len(PENDING_REMOTE))
        row = self._conn().execute(
            f"SELECT COALESCE(SUM(est_tokens), 0) FROM batch_jobs WHERE model = ? AND endpoint = ? "
            f"AND status IN ({marks})", (model, endpoint, *PENDING_REMOTE)).fetchone()
        return int(row[0])

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def read_status(path: str | Path) -> dict[tuple[str, int | None], list[Job]]:
    """(stage, shard) -> its jobs, read-only (for whoever watches a run; no tables, no rows)."""
    path = Path(path)
    if not path.exists():
        return {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(f"SELECT {','.join(_JOB_COLUMNS)} FROM batch_jobs ORDER BY created, uid").fetchall()
    except sqlite3.OperationalError:  # no batch table yet
        return {}
    finally:
        con.close()
    out: dict[tuple[str, int | None], list[Job]] = {}
    for row in rows:
        job = Job(*row)
        out.setdefault((job.stage, job.shard), []).append(job)
    return out
