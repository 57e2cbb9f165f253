"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every writer of the project goes through here: store shards, the funnel, run summaries, data
cards and their figures. The data is written to a dot-file in the target's folder (same file
system, so the final ``os.replace`` is atomic) and renamed into place; ``durable=True`` also
fsyncs the file and its folder, so the write survives a power cut (the work store needs that;
a card can be regenerated).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = False) -> Iterator[IO[bytes]]:
    """Open a temporary file for writing; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str, durable: bool = False) -> Path:
    """Replace ``path`` with ``data`` (text is written as UTF-8)."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path, durable) as fh:
        fh.write(blob)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, sort_keys: bool = True) -> Path:
    """``data`` as indented JSON plus a final newline (values JSON cannot hold become strings)."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str, ensure_ascii=False) + "\n"
    return write_atomic(path, text)


def write_if_changed(path: str | os.PathLike, data: bytes | str) -> bool:
    """Write ``data`` unless the file already holds exactly it (True when written), so that
    regenerating identical output leaves file times and Git status alone."""
    path = Path(path)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    if path.exists() and path.stat().st_size == len(blob) and path.read_bytes() == blob:
        return False
    write_atomic(path, blob)
    return True


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replace_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling folder; on success it replaces ``path`` (whose old contents go),
    on error it is removed: readers see the old folder or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
