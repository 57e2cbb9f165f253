"""The funnel of a filter run: how many samples each check kept, why the others left, the VAS
criterion and its distribution, and per-stage usage; written to ``<store>/funnel.json`` and
read by the data card and the run report."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import write_json_atomic
from pipeline.store import StageStore, WorkStore

FUNNEL_FILE = "funnel.json"


@dataclass
class Funnel:
    """Counts of one filter run (JSON-serialisable; the data card renders it)."""

    steps: dict[str, int] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)
    vas: dict = field(default_factory=dict)  # criterion, metric, threshold, quantile, resolved threshold, stats
    upstream: dict[str, dict] = field(default_factory=dict)  # earlier store stages: results/rejects/reasons
    usage: dict[str, dict] = field(default_factory=dict)  # teacher tokens per stage over all filter inputs
    config: dict = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.steps.get("unique", 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Funnel:
        return cls(**{k: data.get(k) or {} for k in ("steps", "rejects", "vas", "upstream", "usage", "config")})

    def write(self, path: str | os.PathLike) -> Path:
        """Atomically write the funnel as JSON (stages keep their pipeline order)."""
        return write_json_atomic(path, self.to_dict(), sort_keys=False)


def tally_usage(usage: dict[str, dict], record: dict) -> None:
    """Add ``record``'s teacher token usage to ``usage`` (per stage; cached calls cost nothing now)."""
    for name, out in (record.get("stages") or {}).items():
        used = (out or {}).get("usage") or {}
        row = usage.setdefault(name, {"samples": 0, "cached": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                      "billed_prompt_tokens": 0, "billed_completion_tokens": 0})
        prompt, completion = int(used.get("prompt_tokens") or 0), int(used.get("completion_tokens") or 0)
        row["samples"] += 1
        row["prompt_tokens"] += prompt
        row["completion_tokens"] += completion
        if out.get("cached"):
            row["cached"] += 1
        else:
            row["billed_prompt_tokens"] += prompt
            row["billed_completion_tokens"] += completion


def histogram(values: list[float], max_bins: int = 30) -> dict:
    """Counts of ``values`` over equal-width bins (JSON-able; the card draws the candidates from it)."""
    bins = min(max_bins, max(5, len(values) // 3))
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


QUANTILES = (("min", 0.0), ("p10", 0.1), ("p25", 0.25), ("median", 0.5), ("p75", 0.75),
             ("p90", 0.9), ("max", 1.0))


def quantile_summary(values: list[float]) -> dict:
    """n and the exact quantiles of ``values`` (linear interpolation), for cards and reports."""
    data = np.asarray(values, dtype=float)
    return {"n": int(data.size), **{name: float(np.quantile(data, q)) for name, q in QUANTILES}}


def store_summary(store: WorkStore, stages: Iterable[str] | None = None,
                  exclude: Iterable[str] = ("filter",)) -> dict[str, dict]:
    """Results, rejects and reject reasons of each stage in the store (for the funnel), in the
    order of ``stages`` (the pipeline's; default: every stage folder, by name)."""
    if stages is None:
        stages = sorted(p.name for p in store.root.iterdir() if p.is_dir() and not p.name.startswith("."))
    out = {}
    for name in stages:
        stage = StageStore(store.root, name)
        if name in set(exclude) or not stage.shards():
            continue
        out[name] = {**stage.counts(), "reasons": stage.reject_reasons()}
    return out


def load_funnel(store_root: str | os.PathLike) -> Funnel | None:
    path = Path(store_root) / FUNNEL_FILE
    return Funnel.from_dict(json.loads(path.read_text(encoding="utf-8"))) if path.exists() else None


def funnel_line(funnel: dict) -> str:
    """The funnel in one readable console line: each check's survivors, the VAS cut, and the view
    that separates real samples from controls best (when the run scored controls)."""
    steps = funnel.get("steps") or {}
    vas = funnel.get("vas") or {}
    chain = " -> ".join(f"{steps[s]} {s}" for s in steps)
    cut = vas.get("resolved_threshold")
    line = f"{chain} ({steps.get('unique', 0)} kept)" if steps else "no candidate reached the filter"
    if vas.get("criterion") not in (None, "none") and cut is not None:
        quantile = f", top {100 * vas['quantile']:.0f}%" if vas.get("quantile") else ""
        line += f"; VAS: {vas.get('metric')} >= {cut:.4g}{quantile}"
    controls = vas.get("controls") or {}
    if controls.get("best"):
        best = controls["best"]
        line += f"; controls: best view {best} (mean AUC {controls['mean_auc'][best]:.3f})"
        if vas.get("metric") in controls.get("mean_auc", {}) and vas.get("metric") != best:
            line += f", filter's {vas['metric']} {controls['mean_auc'][vas['metric']]:.3f}"
    return line
