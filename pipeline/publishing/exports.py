"""Exports of a published dataset for other training frameworks, streamed from its parquet shards.

- EasyR1 / verl: ``<split>.parquet`` with ``problem`` (one ``<image>`` placeholder per image in
  front of the question), ``answer`` and ``images`` (EasyR1's default prompt/answer/image keys),
  loadable with ``datasets.load_dataset(folder)``.
- LLaMA-Factory: sharegpt JSON (``messages`` with ``<image>`` tags in the user turn, ``images``
  as paths relative to the folder) plus the ``dataset_info.json`` entries that name them; image
  files are written under ``images/``. Point LLaMA-Factory's ``dataset_dir`` at the folder.

Both read the shards one record batch at a time, so memory does not grow with the dataset.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.publishing.cards import safe_name

IMAGE_TAG = "<image>"
BATCH_ROWS = 64
_TEXT = datasets.Value("string")
EASYR1_FEATURES = datasets.Features({
    "id": _TEXT, "problem": _TEXT, "answer": _TEXT, "answer_type": _TEXT,
    "images": datasets.List(datasets.Image()),
})


def _batches(shards: list[Path], columns: list[str]) -> Iterator[list[dict]]:
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield batch.to_pylist()


def export_easyr1(shards: dict[str, list[Path]], folder: Path, dataset_name: str, features=None) -> dict[str, Path]:
    """``<folder>/<split>.parquet`` per split; returns the files."""
    schema = EASYR1_FEATURES.arrow_schema
    out = {}
    for split, files in shards.items():
        path = folder / f"{split}.parquet"
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for rows in _batches(files, ["id", "images", "problem", "answer", "answer_type"]):
                for row in rows:
                    row["problem"] = IMAGE_TAG * len(row["images"]) + row["problem"]
                writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=BATCH_ROWS)
        out[split] = path
    return out


def _extension(data: bytes) -> str:
    fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
    return {"jpeg": "jpg"}.get(fmt, fmt)


def _user_text(messages: list[dict]) -> str:
    user = next(m for m in messages if m["role"] == "user")
    return "".join(part["text"] for part in user["content"] if part["type"] == "text" and part["text"])


def export_llamafactory(shards: dict[str, list[Path]], folder: Path, dataset_name: str, features=None) -> dict[str, Path]:
    """sharegpt ``<dataset>_<split>.json`` files, ``images/`` and ``dataset_info.json``."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    info, out = {}, {}
    for split, files in shards.items():
        entry = f"{dataset_name}_{split}"
        path = folder / f"{entry}.json"
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("[")
            first = True
            for rows in _batches(files, ["id", "images", "messages", "response"]):
                for row in rows:
                    rel_paths = []
                    for i, image in enumerate(row["images"]):
                        rel = f"images/{safe_name(row['id'])}-{i}.{_extension(image['bytes'])}"
                        (folder / rel).write_bytes(image["bytes"])
                        rel_paths.append(rel)
                    item = {"id": row["id"], "images": rel_paths, "messages": [
                        {"role": "user", "content": IMAGE_TAG * len(rel_paths) + _user_text(row["messages"])},
                        {"role": "assistant", "content": row["response"]}]}
                    fh.write(("\n" if first else ",\n") + json.dumps(item, ensure_ascii=False))
                    first = False
            fh.write("\n]\n")
        info[entry] = {"file_name": path.name, "formatting": "sharegpt",
                       "columns": {"messages": "messages", "images": "images"},
                       "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                "assistant_tag": "assistant"}}
        out[split] = path
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out
