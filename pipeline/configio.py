"""Typed configuration: YAML files -> nested dataclasses, validated before any work starts.

The generic part, at the bottom of the import graph: each module declares its own config
dataclass next to its code (seeds, teacher stages, VAS, filter, publish); ``flows/config.py``
composes them into the run's ``SynthConfig``. Every field carries ``metadata={"help": ...}``
(``config_help`` lists them) and, when it does not change the output, ``"volatile": True``
(left out of :func:`config_digest`).

Loading is strict: an unknown key, a wrong type or a bad enum value raises :class:`ConfigError`
naming the full key path (``stages.reason.teacher.max_concurrency: expected int, got 'ten'``).
Secrets never go in a config: a key named like a secret (``api_key``, ``token``, ...) is
refused with a pointer to the environment variable mechanism (``TeacherConfig.api_key_env``,
``HF_TOKEN``).

The converter is hand-written (~150 lines) rather than pydantic/dacite because the config
dataclasses belong to many modules and stay plain ``dataclasses``; the only needs are strict
type checks with full key paths, ``Literal`` enums and secret refusal, which neither library
gives in exactly this form without wrapping every class.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PermanentError
from pipeline.ids import stable_hash

SECRET_KEYS = frozenset({"api_key", "apikey", "token", "hf_token", "access_token", "secret",
                         "password", "openai_api_key", "auth_token", "bearer_token"})


class ConfigError(ValueError, PermanentError):
    """A configuration problem, always naming the offending key path."""


# --------------------------------------------------------------------------- YAML

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping (empty file -> {}); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value parsed as a YAML scalar/list/map)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the literal text; type checks happen later
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of ``data`` with each ``key.sub=value`` override applied."""
    out = _deep_copy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[:depth + 1])
                raise ConfigError(f"override {item!r}: {where} is a {type(child).__name__}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- conversion

def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def refuse_secrets(data: Any, path: str = "") -> None:
    """Raise if any mapping key anywhere in ``data`` names a secret."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            where = _join(path, key)
            if str(key).lower() in SECRET_KEYS:
                raise ConfigError(
                    f"{where}: secrets never go in a config file; put the value in an environment "
                    f"variable and name that variable instead (teachers: api_key_env, e.g. "
                    f"OPENAI_API_KEY; Hub uploads read HF_TOKEN)")
            refuse_secrets(value, where)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            refuse_secrets(value, f"{path}[{i}]")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, strictly. Errors name the full key path."""
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {_describe(data)}")
    refuse_secrets(data, path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key (known keys of "
                          f"{path or '<root>'}: {known})")
    kwargs = {}
    for name, fld in fields.items():
        where = _join(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], where)
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a __post_init__ check of the owning module
        text = str(err).strip()
        head, sep, rest = text.partition(":")
        # Messages start with their field ("n: ..." or "seeds.n: ..."): make it a full key path.
        parent = path.rsplit(".", 1)[-1] + "." if path else ""
        rel = head[len(parent):] if parent and head.startswith(parent) else head
        if sep and rel.split("/")[0] in fields:
            raise ConfigError(f"{_join(path, rel)}:{rest}") from None
        raise ConfigError(f"{path or '<root>'}: {text}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        expected = " | ".join(_type_name(a) for a in args)
        raise ConfigError(f"{path}: expected {expected}, got {_describe(value)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        choices = " | ".join(repr(a) for a in args)
        raise ConfigError(f"{path}: expected one of {choices}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected a list of {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return (origin or list)(items) if origin in (tuple, set, frozenset) else items
    if origin is dict or tp is dict or origin is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        key_tp, val_tp = args if args else (Any, Any)
        refuse_secrets(value, path)
        return {_convert(key_tp, k, _join(path, k)): _convert(val_tp, v, _join(path, k))
                for k, v in value.items()}
    return _scalar(tp, value, path)


def _scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and issubclass(tp, os.PathLike):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        raise ConfigError(f"{path}: unsupported annotation {tp!r} in the config class")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")


# --------------------------------------------------------------------------- export

def to_dict(config: Any) -> dict:
    """Plain, YAML/JSON-serialisable form of a config dataclass (paths as strings)."""
    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Mapping):
            return {str(k): plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple, set, frozenset)):
            return [plain(v) for v in obj]
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        return obj
    return plain(config)


def is_volatile(fld: dataclasses.Field) -> bool:
    """A field that does not change the output (concurrency, retries, paths of run
    infrastructure), declared where the field is: ``metadata={"volatile": True}``."""
    return bool(fld.metadata.get("volatile"))


def stable_dict(config: Any) -> dict:
    """``to_dict`` minus the volatile fields (see :func:`is_volatile`), recursively."""
    def keep(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: keep(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if not is_volatile(f)}
        return to_dict(obj)
    return keep(config)


def config_digest(config: Any) -> str:
    """sha256 of the output-relevant part of a config (for provenance and cards)."""
    return stable_hash(stable_dict(config))


def config_help(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, help) for every field, recursively."""
    rows = []
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        key = _join(prefix, fld.name)
        tp = hints[fld.name]
        if dataclasses.is_dataclass(tp):
            rows += config_help(tp, key)
        else:
            rows.append((key, _type_name(tp), fld.metadata.get("help", "")))
    return rows


def load(cls: type, path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
         data: Mapping | None = None) -> Any:
    """Read YAML at ``path`` (or take ``data``), apply overrides, and build ``cls`` strictly."""
    raw = dict(data or {}) if path is None else read_yaml(path)
    raw = apply_overrides(raw, overrides)
    return from_dict(cls, raw)
