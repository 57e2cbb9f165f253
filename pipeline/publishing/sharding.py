"""Sorted, size-capped parquet shards from an unsorted stream of rows, in bounded memory.

Each incoming row is spilled to its own small Arrow IPC file (:class:`RowSpill`); once every id
is known, :func:`plan_shards` cuts the id-sorted rows at a byte budget and :func:`write_shards`
reads the rows back in id order, one row group at a time. Peak memory is one row group plus the
id list, whatever the dataset size; the price is writing the data twice to disk.

Hand-rolled because neither ``datasets`` nor ``pyarrow`` sorts a larger-than-memory stream into
named Hub shards: Arrow's sort and ``Dataset.sort`` materialise the whole table (or its indices
plus a full rewrite), and bucketing by id prefix trades memory for tiny row groups.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ipc


class RowSpill:
    """One Arrow IPC file per row under ``folder/<h[:2]>/<h>.arrow`` (h = sha256 of the id)."""

    def __init__(self, folder: Path, features: datasets.Features):
        self.folder, self.features, self.schema = Path(folder), features, features.arrow_schema
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, row_id: str) -> Path:
        h = hashlib.sha256(row_id.encode("utf-8")).hexdigest()
        return self.folder / h[:2] / f"{h}.arrow"

    def add(self, row: dict) -> None:
        path = self._path(row["id"])
        path.parent.mkdir(exist_ok=True)
        table = pa.Table.from_pylist([self.features.encode_example(row)], schema=self.schema)
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, self.schema) as writer:
            writer.write_table(table)

    def read(self, row_ids: list[str]) -> pa.Table:
        tables = []
        for row_id in row_ids:
            with pa.memory_map(str(self._path(row_id)), "r") as source:
                tables.append(ipc.open_file(source).read_all())
        return pa.concat_tables(tables) if tables else self.schema.empty_table()


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Ids of each shard: the id-sorted rows cut greedily so a shard stays within ``max_bytes``
    (a single larger row gets a shard of its own)."""
    shards: list[list[str]] = []
    current = 0
    for row_id, nbytes in sorted(sizes):
        if not shards or (current and current + nbytes > max_bytes):
            shards.append([])
            current = 0
        shards[-1].append(row_id)
        current += nbytes
    return shards


def write_shards(spill: RowSpill, plans: dict[str, list[list[str]]], staging: Path,
                 row_group_rows: int = 64, progress: Callable[[int], None] | None = None) -> list[Path]:
    """``<split>-<i>-of-<n>.parquet`` in ``staging`` for every planned shard; rows in plan order."""
    written = []
    for split, shards in plans.items():
        for index, ids in enumerate(shards):
            path = staging / f"{split}-{index:05d}-of-{len(shards):05d}.parquet"
            with pq.ParquetWriter(path, spill.schema, compression="zstd") as writer:
                for start in range(0, len(ids), row_group_rows):
                    chunk = ids[start:start + row_group_rows]
                    writer.write_table(spill.read(chunk), row_group_size=row_group_rows)
                    if progress is not None:
                        progress(len(chunk))
            written.append(path)
    return written
