"""Config loading: strict types with full key paths, overrides, secret refusal, digest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.configio import (
    ConfigError,
    apply_overrides,
    config_digest,
    config_help,
    from_dict,
    load,
    parse_override,
    read_yaml,
    to_dict,
)
from tests.support.config import missing_help

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Teacher:
    backend: Literal["openai", "vllm", "programmatic"] = field(default="programmatic", metadata={"help": "b"})
    max_concurrency: int = field(default=16, metadata={"help": "c", "volatile": True})
    temperature: float = field(default=0.7, metadata={"help": "t"})
    base_url: str | None = field(default=None, metadata={"help": "u"})
    extra: dict[str, int] = field(default_factory=dict, metadata={"help": "e"})


@dataclass
class Stage:
    teacher: Teacher = field(default_factory=Teacher, metadata={"help": "teacher"})
    layers: list[int] | None = field(default=None, metadata={"help": "l"})
    enabled: bool = field(default=True, metadata={"help": "on"})


@dataclass
class Root:
    name: str = field(metadata={"help": "required"})
    reason: Stage = field(default_factory=Stage, metadata={"help": "s"})
    size: tuple[int, int] = field(default=(384, 448), metadata={"help": "sz"})
    out: Path = field(default=Path("out"), metadata={"help": "p"})


def test_nested_conversion_and_defaults():
    cfg = from_dict(Root, {"name": "x", "reason": {"teacher": {"max_concurrency": 4, "temperature": 1},
                                                   "layers": [0, 2]}, "size": [10, 20], "out": "a/b"})
    assert cfg.reason.teacher.max_concurrency == 4
    assert cfg.reason.teacher.temperature == 1.0 and isinstance(cfg.reason.teacher.temperature, float)
    assert cfg.reason.layers == [0, 2]
    assert cfg.size == (10, 20)
    assert cfg.out == Path("a/b")
    assert cfg.reason.teacher.backend == "programmatic"  # default kept


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "reason": {"teacher": {"max_concurrency": "ten"}}},
     "reason.teacher.max_concurrency: expected int, got 'ten'"),
    ({"name": "x", "reason": {"teacher": {"max_concurrency": True}}},
     "reason.teacher.max_concurrency: expected int, got True"),
    ({"name": "x", "reason": {"teacher": {"backend": "gemini"}}},
     "reason.teacher.backend: expected one of 'openai' | 'vllm' | 'programmatic', got 'gemini'"),
    ({"name": "x", "reason": {"teachr": {}}}, "reason.teachr: unknown key"),
    ({"name": "x", "reason": {"layers": [0, "one"]}}, "reason.layers[1]: expected int, got 'one'"),
    ({"name": "x", "reason": {"layers": 3}}, "reason.layers: expected"),
    ({"name": "x", "reason": {"teacher": {"extra": {"a": 1.5}}}}, "reason.teacher.extra.a: expected int, got 1.5"),
    ({"name": "x", "reason": {"enabled": "yes"}}, "reason.enabled: expected bool, got 'yes'"),
    ({"name": "x", "reason": "fast"}, "reason: expected a mapping for Stage, got 'fast'"),
    ({"name": "x", "size": [1, 2, 3]}, "size: expected a list of 2 items, got 3"),
    ({}, "name: required key is missing"),
])
def test_errors_name_the_full_key_path(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Root, data)
    assert message in str(err.value)


@pytest.mark.parametrize("key", ["api_key", "token", "HF_TOKEN", "password"])
def test_secrets_are_refused_anywhere(key):
    with pytest.raises(ConfigError, match=rf"reason\.teacher\.{key}: secrets never go in a config.*api_key_env"):
        from_dict(Root, {"name": "x", "reason": {"teacher": {key: "sk-123"}}})
    with pytest.raises(ConfigError, match=rf"reason\.teacher\.extra\.{key}: secrets"):
        from_dict(Root, {"name": "x", "reason": {"teacher": {"extra": {key: 1}}}})


def test_overrides_parse_yaml_values_and_create_paths():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=ten") == (["a"], "ten")
    assert parse_override("a=x=y") == (["a"], "x=y")
    data = {"name": "x", "reason": {"teacher": {"temperature": 0.1}}}
    out = apply_overrides(data, ["reason.teacher.max_concurrency=8", "reason.layers=[1]"])
    assert out["reason"]["teacher"] == {"temperature": 0.1, "max_concurrency": 8}
    assert "max_concurrency" not in data["reason"]["teacher"]  # input not mutated
    cfg = from_dict(Root, out)
    assert cfg.reason.teacher.max_concurrency == 8 and cfg.reason.layers == [1]
    for bad in ["novalue", "=3", "a..b=1"]:
        with pytest.raises(ConfigError, match="expected key.sub=value"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="name is a str, not a mapping"):
        apply_overrides(data, ["name.x=1"])
    with pytest.raises(ConfigError, match="reason.teacher.max_concurency: unknown key"):
        load(Root, data=data, overrides=["reason.teacher.max_concurency=8"])


def test_yaml_file_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("name: demo\nreason:\n  teacher:\n    max_concurrency: 2\n")
    assert load(Root, good, ["reason.enabled=false"]).reason.enabled is False
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'name' at line 2"):
        read_yaml(dup)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        read_yaml(broken)
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_yaml(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        read_yaml(scalar)


def test_digest_ignores_volatile_fields_only():
    a = from_dict(Root, {"name": "x"})
    b = from_dict(Root, {"name": "x", "reason": {"teacher": {"max_concurrency": 99}}})
    c = from_dict(Root, {"name": "x", "reason": {"teacher": {"temperature": 0.1}}})
    assert config_digest(a) == config_digest(b)
    assert config_digest(a) != config_digest(c)
    assert to_dict(a)["out"] == "out" and to_dict(a)["size"] == [384, 448]


def test_help_lists_every_leaf():
    keys = [k for k, _, _ in config_help(Root)]
    assert "reason.teacher.max_concurrency" in keys and "size" in keys
    assert missing_help(Root) == []

    @dataclass
    class Undocumented:
        a: int = 1
    assert missing_help(Undocumented) == ["a"]
    assert dataclasses.fields(Undocumented)[0].name == "a"


@pytest.mark.parametrize("name", ["demo.yaml", "ci_small.yaml", "synth.example.yaml", "synth_qwen3_vl_8b.example.yaml"])
def test_shipped_configs_validate(name):
    from flows.config import load_synth_config
    config = load_synth_config(REPO / "configs" / name)
    assert config.stages.reason.teacher.backend in ("openai", "vllm", "programmatic")
    assert config.publish.dataset_name


def test_synth_config_is_documented_and_digest_ignores_run_settings():
    from flows.config import SynthConfig, load_synth_config
    assert missing_help(SynthConfig) == []
    base = load_synth_config(REPO / "configs" / "ci_small.yaml")
    same = load_synth_config(REPO / "configs" / "ci_small.yaml", [
        "run.store_dir=/elsewhere", "run.n_shards=9", "stages.reason.teacher.max_concurrency=3",
        "publish.out_dir=/tmp/x", "vas.batch_size=16"])
    other = load_synth_config(REPO / "configs" / "ci_small.yaml", ["stages.reason.sampling={temperature: 0.1}"])
    assert base.digest() == same.digest()
    assert base.digest() != other.digest()


def test_volatility_is_declared_on_each_field_and_only_there():
    """What the digest leaves out is exactly the fields marked volatile where they are declared:
    run infrastructure, concurrency, endpoints, prices, progress, publish destinations."""
    from flows.config import SynthConfig
    from pipeline.configio import is_volatile

    def volatile(cls, prefix=""):
        out = []
        for fld in dataclasses.fields(cls):
            key = f"{prefix}{fld.name}"
            if dataclasses.is_dataclass(fld.type) or isinstance(fld.default_factory, type) and \
                    dataclasses.is_dataclass(fld.default_factory):
                out += volatile(fld.default_factory, key + ".")
            elif is_volatile(fld):
                out.append(key)
        return out

    keys = volatile(SynthConfig)
    assert {"stages.reason.teacher.max_concurrency", "stages.describe.teacher.base_url",
            "vas.batch_size", "publish.out_dir", "publish.repo_id"} <= set(keys)
    assert all(k.startswith("run.") for k in keys if k.split(".")[0] == "run") and "run.n_shards" in keys
    # where seed problems come from changes the data: never volatile
    assert not [k for k in keys if k.startswith("seeds.")]
