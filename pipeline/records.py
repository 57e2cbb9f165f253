"""The record contract: JSON Schemas in ``schemas/`` and the validator used at every boundary.

A record that fails validation becomes a :class:`Reject` naming the field, never a crash.
Binary image bytes are declared with the custom keyword ``x-binary`` (JSON Schema has no bytes
type; 2020-12 permits extra keywords), checked by the validator built here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

import jsonschema
from referencing import Registry, Resource

from pipeline.resources import schemas_dir

KINDS = ("seed", "sample", "reject")


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _x_binary(validator, value, instance, schema):
    if value and not isinstance(instance, (bytes, bytearray, memoryview)):
        yield jsonschema.ValidationError(f"expected binary bytes, got {type(instance).__name__}")


@cache
def _registry() -> Registry:
    resources = []
    for kind in KINDS:
        contents = json.loads((schemas_dir() / f"{kind}.schema.json").read_text())
        resource = Resource.from_contents(contents)
        resources += [(contents["$id"], resource), (f"{kind}.schema.json", resource)]
    return Registry().with_resources(resources)


@cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    schema = json.loads((schemas_dir() / f"{kind}.schema.json").read_text())
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-binary": _x_binary})
    return cls(schema, registry=_registry(), format_checker=jsonschema.FormatChecker())


class RecordError(ValueError):
    """A record broke the contract. ``field`` is a JSON path such as ``$.images[0].bytes``."""

    def __init__(self, record_id: str | None, field: str, message: str):
        self.record_id, self.field, self.message = record_id, field, message
        super().__init__(f"record {record_id or '<no id>'}: field {field}: {message}")


def _path(error: jsonschema.ValidationError) -> str:
    out = "$"
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    if error.validator == "required":  # name the missing field itself
        missing = error.message.split("'")[1] if "'" in error.message else ""
        out += f".{missing}" if missing else ""
    return out


def errors(kind: str, record: Any) -> list[RecordError]:
    """All contract violations of ``record``, most specific first."""
    rid = record.get("id") if isinstance(record, dict) else None
    found = sorted(validator(kind).iter_errors(record), key=lambda e: (-len(e.absolute_path), e.message))
    return [RecordError(rid if isinstance(rid, str) else None, _path(e), _short(e)) for e in found]


def _short(error: jsonschema.ValidationError) -> str:
    msg = error.message
    return msg if len(msg) <= 300 else msg[:300] + "..."


def validate(kind: str, record: Any) -> None:
    """Raise :class:`RecordError` for the first violation."""
    found = errors(kind, record)
    if found:
        raise found[0]


def validate_output(kind: str, record: dict, produces: tuple[str, ...] | list[str] = (),
                    stage: str | None = None) -> None:
    """Validate ``record`` against schema ``kind`` plus the dotted fields a stage declares it
    ``produces`` (e.g. ``"stages.anchor"``, ``"response"``): the records contract of a stage."""
    validate(kind, record)
    for dotted in produces:
        node: Any = record
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                raise RecordError(record.get("id"), "$." + dotted, f"missing after stage {stage!r}")
            node = node[key]


@dataclass
class Reject:
    """Why a record left the pipeline. Stored beside the stage's results; never silently dropped."""

    id: str
    stage: str
    reason: str
    message: str
    field: str | None = None
    source: str | None = None
    created_at: str = ""

    def __post_init__(self):
        if not self.created_at:
            self.created_at = utcnow()

    @classmethod
    def from_error(cls, stage: str, error: RecordError, reason: str = "schema_invalid", source: str | None = None) -> Reject:
        return cls(id=error.record_id or "unknown", stage=stage, reason=reason,
                   message=error.message, field=error.field, source=source)

    def to_dict(self) -> dict:
        return asdict(self)
