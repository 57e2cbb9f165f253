"""Config-documentation checks for the tests."""

from __future__ import annotations

import dataclasses
import typing


def missing_help(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of config fields without ``metadata["help"]`` (tests keep this empty)."""
    out = []
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        key = f"{prefix}.{fld.name}" if prefix else fld.name
        if dataclasses.is_dataclass(hints[fld.name]):
            if not fld.metadata.get("help"):
                out.append(key)
            out += missing_help(hints[fld.name], key)
        elif not fld.metadata.get("help"):
            out.append(key)
    return out
