"""Seed problems from existing datasets: local folders and files, or the Hugging Face Hub.

Reading is delegated to ``datasets``: ``load_from_disk`` for ``save_to_disk`` folders (memory
mapped), and streaming ``load_dataset`` for everything else (a folder of parquet/jsonl/csv
files, an image folder with ``metadata.jsonl``/``metadata.csv``, single files, a Hub repo id),
with image decoding switched off so images arrive as raw ``{"bytes", "path"}`` and each one goes
through :func:`pipeline.images.image_record` here. Memory stays flat: rows stream one at a time
(Arrow batches of :data:`BATCH_ROWS` for ``save_to_disk`` folders).

Every row becomes a seed record or a :class:`~pipeline.records.Reject` (stage ``"seeds"``)
naming the row and the field: image problems carry the :class:`~pipeline.images.ImageError`
reason (``image_empty``, ``image_corrupt``, ``image_not_an_image``, ``image_too_large``, plus
``image_missing`` for a path that does not exist); absent fields are ``field_missing`` and
wrongly typed ones ``schema_invalid``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PermanentError
from pipeline.ids import sample_id
from pipeline.images import ImageError, image_cell, image_record
from pipeline.records import RecordError, Reject, validate
from pipeline.seeds.config import SeedsConfig

BATCH_ROWS = 64
STAGE = "seeds"
_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}
_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")
_LETTER = re.compile(r"^\(?([A-Ha-h])\)?\.?$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


class RowError(Exception):
    """A row that cannot become a seed: reason code, JSON path of the field, message."""

    def __init__(self, reason: str, field: str, message: str):
        self.reason, self.field, self.message = reason, field, message
        super().__init__(message)


def source_name(config: SeedsConfig) -> str:
    if config.source:
        return config.source
    if config.kind == "hub":
        return str(config.repo_id)
    path = Path(str(config.path)).resolve()
    return (path.name if path.is_dir() else path.stem) or "local"


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (
        (folder / "state.json").exists() and (folder / "dataset_info.json").exists()
    )


def _arrow_rows(dataset) -> Iterator[dict]:
    """Rows of an in-memory/memory-mapped Dataset without decoding images."""
    for table in dataset.with_format("arrow").iter(batch_size=BATCH_ROWS):
        yield from table.to_pylist()


def _pick_split(dataset_dict, split: str, where: str):
    if split not in dataset_dict:
        raise ValueError(
            f"seeds.split: {where} has no split {split!r} (available: {sorted(dataset_dict)})"
        )
    return dataset_dict[split]


def _only_json_lines(folder: Path) -> bool:
    """A folder whose data files are all JSON Lines (an image folder's metadata.jsonl is not)."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(p.suffix.lower() == ".jsonl" and p.parent == folder for p in files)


class BadLine:
    """A line of a JSON Lines file that is not a row: it becomes a reject, the file goes on."""

    def __init__(self, line: int, reason: str, message: str):
        self.line, self.reason, self.message = line, reason, message


def _json_lines(files: list[Path]) -> Iterator[dict | BadLine]:
    """Rows of JSON Lines files, read line by line (not through ``datasets``, which fails the
    whole file on one undecodable line and cannot say which): blank lines skipped; a line that
    is not UTF-8, not JSON or not an object is a :class:`BadLine` with its 1-based number."""
    for path in files:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                where = f"{path.name} line {number}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield BadLine(number, "row_not_utf8", f"{where}: invalid UTF-8 at byte {err.start} of the line")
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    yield BadLine(number, "row_not_json", f"{where}: not JSON ({err.msg} at column {err.colno})")
                    continue
                if not isinstance(row, dict):
                    yield BadLine(number, "row_not_object", f"{where}: a JSON {type(row).__name__}, not an object")
                    continue
                try:  # "\ud800" is valid JSON but no text: it could never be written out
                    json.dumps(row, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as err:
                    yield BadLine(number, "row_not_utf8", f"{where}: a lone surrogate escape ({err.reason})")
                    continue
                yield row


def open_rows(config: SeedsConfig) -> tuple[Iterator[dict | BadLine], Path | None]:
    """(row iterator, folder that relative image paths resolve against)."""
    import datasets  # heavy import, only when a dataset is read

    if config.kind == "hub":
        ds = datasets.load_dataset(
            config.repo_id, name=config.config_name, split=config.split, streaming=config.streaming
        )
        rows = _decode_json_columns(ds, iter(ds.decode(False))) if config.streaming else _arrow_rows(ds)
        return rows, Path(config.image_root) if config.image_root else None
    path = Path(str(config.path)).expanduser()
    if not path.exists():
        raise ValueError(f"seeds.path: {path} does not exist")
    base = (
        Path(config.image_root) if config.image_root else (path if path.is_dir() else path.parent)
    )
    if path.is_file() and path.suffix.lower() == ".jsonl" or path.is_dir() and _only_json_lines(path):
        return _json_lines(sorted(path.glob("*.jsonl")) if path.is_dir() else [path]), base
    if path.is_dir() and _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick_split(ds, config.split, str(path))
        return _arrow_rows(ds), base
    if path.is_dir():
        ds = datasets.load_dataset(
            str(path), name=config.config_name, split=config.split, streaming=True
        )
    else:
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"seeds.path: {path} is not a dataset folder or a "
                f"{'/'.join(sorted(_FILE_BUILDERS))} file"
            )
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    return _decode_json_columns(ds, iter(ds.decode(False))), base


def _decode_json_columns(ds, rows: Iterator[dict]) -> Iterator[dict]:
    """Decode ``Json`` columns, which ``decode(False)`` leaves as JSON text.

    ``datasets`` infers ``Json()`` for a json/jsonl column whose rows mix types (one question a
    list, the others strings); undecoded, every row's value would arrive JSON-quoted.
    """
    names = [n for n, f in (getattr(ds, "features", None) or {}).items() if type(f).__name__ == "Json"]
    if not names:
        return rows
    return ({**row, **{n: json.loads(row[n]) if isinstance(row.get(n), str) else row.get(n) for n in names}}
            for row in rows)


class DatasetReadError(ValueError, PermanentError):
    """The dataset itself cannot be read (not one bad row): inconsistent column types across
    rows, an unreadable file, a missing split. Names the source and where reading stopped."""


def iter_dataset(config: SeedsConfig) -> Iterator[dict | Reject]:
    """Seed records or rejects, one per row, at most ``config.n`` rows."""
    source = source_name(config)
    where = config.repo_id if config.kind == "hub" else config.path
    try:
        rows, base = open_rows(config)
    except ValueError as err:
        if type(err) is ValueError and str(err).startswith("seeds."):  # our own config messages
            raise
        raise DatasetReadError(f"seeds: datasets could not read {where}: {err}") from err
    except Exception as err:  # datasets/pyarrow raise many unrelated types
        raise DatasetReadError(
            f"seeds: datasets could not read {where}: {type(err).__name__}: {err}"
        ) from err
    index = 0
    while config.n is None or index < config.n:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as err:  # as above; row-level problems never land here
            raise DatasetReadError(
                f"seeds: datasets could not read {where} at row {index}: "
                f"{type(err).__name__}: {err}"
            ) from err
        if isinstance(row, BadLine):
            yield Reject(id=f"{source}:row{index}", stage=STAGE, reason=row.reason,
                         message=f"{source} row {index}: {row.message}", field="$", source=source)
        else:
            yield row_to_seed(row, index, config, source, base)
        index += 1


def _text_field(row: dict, column: str, what: str) -> str:
    field = f"$.{column}"
    if column not in row:
        raise RowError(
            "field_missing", field, f"no {what} column {column!r} (columns: {sorted(row)})"
        )
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise RowError("field_missing", field, f"{what} is empty")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError("schema_invalid", field, f"{what} must be text, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise RowError("field_missing", field, f"{what} is empty")
    return text


def _choices(row: dict, column: str | None) -> list[str] | None:
    if not column:
        return None
    value = row.get(column)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError(
                "schema_invalid", f"$.{column}", "choices string is not a JSON list"
            ) from None
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(c, (str, int, float)) for c in value):
        raise RowError(
            "schema_invalid", f"$.{column}", f"choices must be a list of strings, got {value!r:.80}"
        )
    return [str(c) for c in value]


def _answer_type(config: SeedsConfig, answer: str, choices: list[str] | None) -> tuple[str, str]:
    """(answer_type, gold answer), letters normalised to upper case for choice problems."""
    if config.answer_type != "auto":
        return config.answer_type, answer
    letter = _LETTER.match(answer)
    if choices and letter and ord(letter.group(1).upper()) - 65 < len(choices):
        return "choice", letter.group(1).upper()
    if choices and answer in choices:
        return "choice", chr(65 + choices.index(answer))
    if _NUMBER.match(answer.replace(",", "")):
        return "number", answer
    return "text", answer


def row_to_seed(
    row: dict, index: int, config: SeedsConfig, source: str, base: Path | None
) -> dict | Reject:
    """One dataset row as a seed record, or a reject naming the row and the field."""
    where = f"{source} row {index}"
    try:
        question = _text_field(row, config.question_column, "question")
        if config.strip_image_tokens:
            question = _IMAGE_TOKEN.sub(" ", question).strip()
            if not question:
                raise RowError(
                    "field_missing",
                    f"$.{config.question_column}",
                    "question is only <image> tokens",
                )
        answer = _text_field(row, config.answer_column, "answer")
        choices = _choices(row, config.choices_column)
        column = (
            config.image_column if config.image_column in row or "image" not in row else "image"
        )
        if column not in row or row[column] is None or row[column] == []:
            raise RowError("field_missing", f"$.{column}", f"no image in column {column!r}")
        many = isinstance(row[column], (list, tuple))
        items = row[column] if many else [row[column]]
        images = []
        for k, item in enumerate(items):
            field = f"$.{column}[{k}]" if many else f"$.{column}"
            try:
                data, path = image_cell(item, base)
                images.append(image_record(data, path=path, max_pixels=config.max_source_pixels))
            except ImageError as err:
                path_hint = (
                    item.get("path")
                    if isinstance(item, dict)
                    else item
                    if isinstance(item, str)
                    else None
                )
                hint = f" ({path_hint})" if path_hint else ""
                raise RowError(err.reason, field, f"image {k}{hint}: {err.message}") from None
        difficulty = None
        if config.difficulty_column and row.get(config.difficulty_column) is not None:
            difficulty = row[config.difficulty_column]
            if (
                isinstance(difficulty, bool)
                or not isinstance(difficulty, int)
                or not 1 <= difficulty <= 5
            ):
                raise RowError(
                    "schema_invalid",
                    f"$.{config.difficulty_column}",
                    f"difficulty must be an integer 1-5, got {difficulty!r}",
                )
        answer_type, gold = _answer_type(config, answer, choices)
    except RowError as err:
        return Reject(
            id=f"{source}:row{index}",
            stage=STAGE,
            reason=err.reason,
            message=f"{where}: field {err.field}: {err.message}",
            field=err.field,
            source=source,
        )
    record = {
        "id": sample_id([im["bytes"] for im in images], question, source),
        "images": images,
        "question": question,
        "gold_answer": gold,
        "answer_type": answer_type,
        "choices": choices,
        "source": source,
        "difficulty": difficulty,
        "scene": None,
    }
    try:
        validate("seed", record)
    except RecordError as err:
        return Reject(
            id=f"{source}:row{index}",
            stage=STAGE,
            reason="schema_invalid",
            message=f"{where}: field {err.field}: {err.message}",
            field=err.field,
            source=source,
        )
    return record
