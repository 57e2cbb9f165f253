"""Duplicate detection over synthesized samples: exact and near-duplicate, incremental.

* exact: sha256 of the normalised text of the configured fields (default question + response):
  NFKC, case-folded, all whitespace removed (so layout such as a newline between ``</think>`` and
  ``<answer>`` does not matter, while operators and digits still do);
* near: MinHash (``datasketch``) over word n-gram shingles of the same text, indexed in an LSH
  table; a candidate counts only when its estimated Jaccard similarity reaches the threshold
  (LSH alone has false positives).

Incremental and deterministic: :meth:`Deduplicator.check` compares a record with the records
added so far and names the earliest-added one it duplicates, so feeding records in store order
keeps the first of every duplicate group. Resumable: :meth:`Deduplicator.from_records` rebuilds
the index from records already kept. ``same_images_only`` restricts both checks to records with
the same image bytes (for procedural families whose texts are templated).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace

from datasketch import MinHash, MinHashLSH

from pipeline.records import RecordError

_WORD_RE = re.compile(r"\w+")


@dataclass
class DedupConfig:
    threshold: float = field(default=0.9, metadata={
        "help": "Near-duplicate cut: estimated Jaccard similarity of word shingles (0-1]."})
    num_perm: int = field(default=128, metadata={
        "help": "MinHash permutations: more = a more precise similarity estimate, more memory."})
    shingle_words: int = field(default=5, metadata={
        "help": "Words per shingle (texts shorter than this form one shingle)."})
    fields: list[str] = field(default_factory=lambda: ["question", "response"], metadata={
        "help": "Record fields whose text is compared (missing fields count as empty)."})
    near: bool = field(default=True, metadata={
        "help": "Also detect near-duplicates (MinHash LSH); false = exact duplicates only."})
    same_images_only: bool = field(default=False, metadata={
        "help": "Count two records as duplicates only when their images are the same bytes "
                "(sha256); use for templated procedural text over different images."})
    seed: int = field(default=1, metadata={"help": "MinHash seed (fixed: the index is deterministic)."})

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"dedup.threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 16:
            raise ValueError(f"dedup.num_perm must be >= 16, got {self.num_perm}")
        if self.shingle_words < 1:
            raise ValueError(f"dedup.shingle_words must be >= 1, got {self.shingle_words}")
        if not self.fields:
            raise ValueError("dedup.fields must name at least one record field")


class Duplicate(str):
    """The id of the earlier record (a ``str``), with ``reason`` and ``similarity`` attached."""

    reason: str
    similarity: float

    def __new__(cls, of_id: str, reason: str, similarity: float):
        obj = super().__new__(cls, of_id)
        obj.reason, obj.similarity = reason, similarity
        return obj


def normalize_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(text: str, words: int) -> set[str]:
    tokens = _WORD_RE.findall(normalize_text(text))
    if not tokens:
        return set()
    if len(tokens) <= words:
        return {" ".join(tokens)}
    return {" ".join(tokens[i:i + words]) for i in range(len(tokens) - words + 1)}


@dataclass
class _Signature:
    record_id: str
    exact: str
    images: str
    minhash: MinHash | None


class Deduplicator:
    """``check(record)`` -> :class:`Duplicate` or None; ``add(record)`` admits it."""

    def __init__(self, config: DedupConfig | None = None, **overrides):
        known = {f.name for f in fields(DedupConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown dedup option(s) {sorted(unknown)}; known: {sorted(known)}")
        self.config = replace(config or DedupConfig(), **overrides)
        self._lsh = MinHashLSH(threshold=self.config.threshold, num_perm=self.config.num_perm) \
            if self.config.near else None
        self._order: dict[str, int] = {}  # id -> admission rank
        self._exact: dict[str, str] = {}  # exact key -> first id
        self._minhashes: dict[str, MinHash] = {}
        self._images: dict[str, str] = {}
        self._memo: _Signature | None = None
        self._permutations = None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._order

    @classmethod
    def from_records(cls, records: Iterable[dict], config: DedupConfig | None = None,
                     **overrides) -> Deduplicator:
        """An index holding ``records`` (already kept, in store order): resume after a restart."""
        dedup = cls(config, **overrides)
        for record in records:
            dedup.add(record)
        return dedup

    def check(self, record: dict) -> Duplicate | None:
        """The earliest admitted record that ``record`` duplicates, or None (itself excluded)."""
        sig = self._signature(record)
        first = self._exact.get(self._exact_key(sig))
        if first is not None and first != sig.record_id:
            return Duplicate(first, "exact_duplicate", 1.0)
        if self._lsh is None or sig.minhash is None:
            return None
        best: tuple[int, str, float] | None = None
        for other in self._lsh.query(sig.minhash):
            if other == sig.record_id or (self.config.same_images_only and self._images[other] != sig.images):
                continue
            similarity = sig.minhash.jaccard(self._minhashes[other])
            if similarity >= self.config.threshold and (best is None or self._order[other] < best[0]):
                best = (self._order[other], other, similarity)
        return Duplicate(best[1], "near_duplicate", round(best[2], 4)) if best else None

    def add(self, record: dict) -> None:
        """Admit ``record`` (idempotent per id)."""
        sig = self._signature(record)
        if sig.record_id in self._order:
            return
        self._order[sig.record_id] = len(self._order)
        self._exact.setdefault(self._exact_key(sig), sig.record_id)
        self._images[sig.record_id] = sig.images
        if self._lsh is not None and sig.minhash is not None:
            self._minhashes[sig.record_id] = sig.minhash
            self._lsh.insert(sig.record_id, sig.minhash)

    def check_and_add(self, record: dict) -> Duplicate | None:
        """``check`` and, when the record is no duplicate, ``add`` it."""
        found = self.check(record)
        if found is None:
            self.add(record)
        return found

    # -- internals ----------------------------------------------------------------------------

    def _exact_key(self, sig: _Signature) -> str:
        return f"{sig.images}:{sig.exact}" if self.config.same_images_only else sig.exact

    def _signature(self, record: dict) -> _Signature:
        record_id = record.get("id") if isinstance(record, dict) else None
        if not isinstance(record_id, str) or not record_id:
            raise RecordError(None, "$.id", "dedup needs a record id")
        parts = []
        for name in self.config.fields:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise RecordError(record_id, f"$.{name}", f"dedup expects text, got {type(value).__name__}")
            parts.append(value or "")
        text = "\n".join(parts)
        exact = hashlib.sha256("".join(normalize_text(text).split()).encode("utf-8")).hexdigest()
        if self._memo is not None and self._memo.record_id == record_id and self._memo.exact == exact:
            return self._memo  # check() then add() on one record: hash it once
        images = hashlib.sha256("|".join(sorted(str(im.get("sha256", "")) for im in
                                                record.get("images") or [])).encode()).hexdigest()
        grams = shingles(text, self.config.shingle_words)
        minhash = None
        if self._lsh is not None and grams:
            permutations, scheme = self._shared_permutations()
            # crc32 (C, stable across processes) instead of datasketch's default sha1: the
            # per-shingle hash is the hot loop, and 32 bits is all MinHash keeps anyway.
            minhash = MinHash(num_perm=self.config.num_perm, seed=self.config.seed,
                              permutations=permutations, scheme=scheme, hashfunc=zlib.crc32)
            minhash.update_batch([g.encode("utf-8") for g in grams])
        self._memo = _Signature(record_id, exact, images, minhash)
        return self._memo

    def _shared_permutations(self):
        # Generating the permutations is the slow part of MinHash(); they depend only on
        # (num_perm, seed), so build them once per index.
        if self._permutations is None:
            template = MinHash(num_perm=self.config.num_perm, seed=self.config.seed)
            self._permutations = (template.permutations, template.scheme)
        return self._permutations
