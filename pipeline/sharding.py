"""Sorted, size-capped parquet shards from an unsorted stream of rows, in bounded memory.

Rows are spilled to :class:`Buckets` (one file per two-hex-char id prefix), then each bucket is
read, sorted by id and routed by :class:`ShardWriter` to the shard its id falls in
(:func:`plan_shards` cuts the id-sorted rows at a byte budget). Hand-rolled because neither
``datasets`` nor ``pyarrow`` sorts a larger-than-memory stream into named Hub shards: Arrow's
sort and ``Dataset.sort`` materialise the whole table (or its indices plus a full rewrite).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq


class Buckets:
    """Rows spilled to one parquet file per id prefix (two hex chars: 256 buckets), in small batches.

    Content-hash ids are uniform, so a bucket holds about 1/256 of the data and bucket order is id
    order. Peak memory: the flush buffers (at most 256 x flush_bytes) or one bucket.
    """

    def __init__(self, folder: Path, features: datasets.Features, flush_bytes: int = 2_000_000,
                 flush_rows: int = 64):
        self.folder, self.features, self.schema = folder, features, features.arrow_schema
        self.flush_bytes, self.flush_rows = flush_bytes, flush_rows
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.buffers: dict[str, list[dict]] = {}
        self.buffered_bytes: dict[str, int] = {}

    @staticmethod
    def prefix(sample_id: str) -> str:
        head = sample_id[:2].lower()
        return head if len(head) == 2 and all(c in "0123456789abcdef" for c in head) else "__"  # non-hex: one bucket

    def add(self, row: dict, nbytes: int) -> None:
        key = self.prefix(row["id"])
        self.buffers.setdefault(key, []).append(self.features.encode_example(row))
        self.buffered_bytes[key] = self.buffered_bytes.get(key, 0) + nbytes
        if self.buffered_bytes[key] >= self.flush_bytes or len(self.buffers[key]) >= self.flush_rows:
            self._flush(key)

    def _flush(self, key: str) -> None:
        rows = self.buffers.pop(key, [])
        self.buffered_bytes[key] = 0
        if not rows:
            return
        if key not in self.writers:
            self.writers[key] = pq.ParquetWriter(self.folder / f"{key}.parquet", self.schema)
        self.writers[key].write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def close(self) -> None:
        for key in list(self.buffers):
            self._flush(key)
        for writer in self.writers.values():
            writer.close()

    def files(self) -> list[Path]:
        return [self.folder / f"{key}.parquet" for key in sorted(self.writers)]


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[str]:
    """First id of each shard, cutting the id-sorted rows greedily at ``max_bytes``."""
    starts, current = [], 0
    for rid, nbytes in sorted(sizes):
        if not starts or (current and current + nbytes > max_bytes):
            starts.append(rid)
            current = 0
        current += nbytes
    return starts


class ShardWriter:
    """Writes one split's id-sorted rows into its planned shards (a shard starts at its first id)."""

    def __init__(self, split: str, starts: list[str], staging: Path, schema: pa.Schema, row_group_rows: int = 64):
        self.starts, self.schema, self.row_group_rows = starts, schema, row_group_rows
        self.names = [staging / f"{split}-{i:05d}-of-{len(starts):05d}.parquet" for i in range(len(starts))]
        self.writer, self.current = None, -1

    def write(self, table: pa.Table) -> None:
        ids = table.column("id").to_pylist()
        begin = 0
        while begin < len(ids):
            shard = bisect_right(self.starts, ids[begin]) - 1
            end = begin
            while end < len(ids) and bisect_right(self.starts, ids[end]) - 1 == shard:
                end += 1
            if shard != self.current:
                self.close()
                self.writer = pq.ParquetWriter(self.names[shard], self.schema, compression="zstd")
                self.current = shard
            self.writer.write_table(table.slice(begin, end - begin), row_group_size=self.row_group_rows)
            begin = end

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_shards(buckets: Buckets, plans: dict[str, list[str]], staging: Path, split_of: Callable[[str], str],
                 row_group_rows: int = 64) -> list[Path]:
    """All splits' sorted shards into ``staging``, reading one bucket at a time."""
    writers = {s: ShardWriter(s, starts, staging, buckets.schema, row_group_rows) for s, starts in plans.items()}
    try:
        for bucket in buckets.files():
            table = pq.read_table(bucket, schema=buckets.schema).sort_by("id")
            splits = [split_of(i) for i in table.column("id").to_pylist()]
            for split, writer in writers.items():
                writer.write(table.filter(pa.array([s == split for s in splits])))
            del table
    finally:
        for writer in writers.values():
            writer.close()
    return [name for writer in writers.values() for name in writer.names]
