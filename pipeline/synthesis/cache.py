"""Persistent request cache: a teacher request that once succeeded is never sent again.

Key = (backend, model, stage, template sha256, sampling params, sample id, rollout index), see
:func:`request_key`. Only successful responses are stored, each committed the moment it arrives,
so a crash loses at most the requests in flight. SQLite in WAL mode is safe for several
processes on one machine; for a shared cluster file system put the cache on local disk per node
or use one cache per run.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from pipeline.ids import stable_hash


def request_key(backend: str, model: str, stage: str, template_sha256: str, sampling: dict,
                sample_id: str, rollout: int = 0) -> str:
    return stable_hash({"backend": backend, "model": model, "stage": stage,
                        "template": template_sha256, "sampling": sampling,
                        "sample": sample_id, "rollout": rollout})


def response_to_cache(resp) -> dict:
    """What the cache stores of a :class:`~pipeline.synthesis.teachers.base.TeacherResponse`."""
    return {"text": resp.text, "reasoning": resp.reasoning, "prompt_tokens": resp.prompt_tokens,
            "completion_tokens": resp.completion_tokens, "finish_reason": resp.finish_reason,
            "model": resp.model}


def retry_locked(statement, attempts: int = 200, pause_s: float = 0.05):
    """Run ``statement``, retrying while another process holds the lock.

    Switching the journal mode needs an exclusive lock and SQLite does not call its busy handler
    for it, so two processes opening a fresh cache at once can see "database is locked"
    immediately, whatever the connect timeout.
    """
    for attempt in range(attempts):
        try:
            return statement()
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(pause_s)


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        con = self._conn()
        retry_locked(lambda: con.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, stage TEXT,"
                        " response TEXT NOT NULL, created REAL DEFAULT (unixepoch('subsec')))"))

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            retry_locked(lambda: con.execute("PRAGMA journal_mode=WAL"))
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

    def get(self, key: str) -> dict | None:
        row = self._conn().execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        con = self._conn()
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for key, resp in con.execute(f"SELECT key, response FROM responses WHERE key IN ({marks})", chunk):
                out[key] = json.loads(resp)
        return out

    def put(self, key: str, response: dict, stage: str = "") -> None:
        self._conn().execute("INSERT OR REPLACE INTO responses (key, stage, response) VALUES (?, ?, ?)",
                             (key, stage, json.dumps(response, ensure_ascii=False)))

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
