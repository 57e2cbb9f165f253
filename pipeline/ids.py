"""Stable content-hash ids: every stage is keyed by them, so re-running is free."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ID_HEX_CHARS = 32  # 128 bits: collision-free for any dataset this tool will see


def sample_id(image_bytes: Iterable[bytes], question: str, source: str) -> str:
    """Id of a seed problem: sha256 over its image bytes, question and source."""
    h = hashlib.sha256()
    for blob in image_bytes:
        h.update(hashlib.sha256(blob).digest())
    h.update(b"\x00q\x00" + question.encode("utf-8", "surrogatepass"))
    h.update(b"\x00s\x00" + source.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:ID_HEX_CHARS]


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (cache keys, config digests)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (published shards, reference-model weights)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
