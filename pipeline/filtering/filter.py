"""The sample filter: which synthesized samples are good enough to publish.

The paper gives no filtering rules; ours (SPEC.md, VARD) keep a sample only if, in this order:

1. its answer verified against the gold answer (``answer_wrong``),
2. its response has the ``<think>...</think><answer>...</answer>`` format (``format_invalid``),
3. it has at least ``min_anchors`` visual anchors (``no_anchors``),
4. its response length is within bounds (``too_short`` / ``too_long``),
5. its response VAS passes the threshold or the run quantile (``vas_below_threshold``),
6. it is not a duplicate of a sample kept before it (``exact_duplicate`` / ``near_duplicate``).

The VAS check runs before deduplication so that a low-VAS sample never takes the place of a later
near-duplicate that would have passed. A VAS quantile (``vas_quantile=0.5`` keeps the top half) is
resolved over this run's candidates, i.e. the samples that pass checks 1-4, in a first streaming
pass that keeps only the VAS floats. Every check's outcome is counted in a :class:`Funnel`
(written to ``<store>/funnel.json``), which the data card reports together with the VAS criterion.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from pipeline.filtering.dedup import DedupConfig, Deduplicator
from pipeline.filtering.funnel import (
    FUNNEL_FILE,
    Funnel,
    histogram,
    quantile_summary,
    store_summary,
    tally_usage,
)
from pipeline.records import Reject
from pipeline.response_format import format_ok
from pipeline.store import StageStore, WorkStore
from pipeline.vas.separation import METRICS, ControlSeparation, view_value

STAGE = "filter"
REASONS = ("answer_wrong", "format_invalid", "no_anchors", "too_short", "too_long",
           "vas_below_threshold", "exact_duplicate", "near_duplicate", "schema_invalid")
# Names of the funnel steps, in check order; each counts the samples still in after that check.
STEPS = ("input", "correct", "format", "anchors", "length", "vas", "unique")


@dataclass
class FilterConfig:
    require_correct: bool = field(default=True, metadata={"help": "Drop samples whose answer did not verify against the gold answer (reason answer_wrong)."})
    require_format: bool = field(default=True, metadata={"help": "Drop samples whose response is not exactly <think>...</think><answer>...</answer> with non-empty parts (reason format_invalid)."})
    min_anchors: int = field(default=1, metadata={"help": "Fewest visual anchors (look-back sentences, pipeline.synthesis.anchors) a kept sample has; >= 1 (reason no_anchors)."})
    length_unit: Literal["chars", "tokens"] = field(default="chars", metadata={"help": "Unit of the response length bounds: characters or whitespace-separated tokens."})
    min_response_length: int = field(default=0, metadata={"help": "Shortest allowed response, in length_unit (reason too_short)."})
    max_response_length: int | None = field(default=None, metadata={"help": "Longest allowed response, in length_unit; null for no bound (reason too_long)."})
    dedup: bool = field(default=True, metadata={"help": "Drop exact duplicates (same images and normalized question) and near-duplicates of samples kept earlier."})
    near_duplicate_threshold: float = field(default=0.9, metadata={"help": "Estimated Jaccard similarity (MinHash over word shingles of dedup_fields, pipeline.filtering.dedup) at or above which a sample is a near-duplicate."})
    dedup_fields: list[str] = field(default_factory=lambda: ["question", "response"], metadata={"help": "Record text fields compared for exact/near duplicates (besides same images + same question, always an exact duplicate)."})
    dedup_same_images_only: bool = field(default=True, metadata={"help": "Text duplicates count only between samples with the same images: templated procedural text over different images is not a duplicate."})
    vas_metric: str = field(default="normalized", metadata={"help": "Which VAS the VAS criterion reads: 'normalized' (raw / (|I|/|S|), comparable across image sizes) or 'raw' of the configured vas.queries, or a view '<queries>.<view>' with queries user|response and view raw|normalized|ratio_of_means|image_share (e.g. response.image_share; pipeline.vas.separation)."})
    vas_threshold: float | None = field(default=None, metadata={"help": "Keep samples whose VAS (vas_metric) is >= this value. Exclusive with vas_quantile; both null: no VAS criterion."})
    vas_quantile: float | None = field(default=None, metadata={"help": "Keep the top fraction q of this run's candidates by VAS (0.5 keeps the top half; ties at the cut are kept). Exclusive with vas_threshold."})

    def __post_init__(self):
        if self.min_anchors < 1:
            raise ValueError(f"filter.min_anchors: must be >= 1, got {self.min_anchors}")
        if self.min_response_length < 0:
            raise ValueError(f"filter.min_response_length: must be >= 0, got {self.min_response_length}")
        if self.max_response_length is not None and self.max_response_length < max(1, self.min_response_length):
            raise ValueError(f"filter.max_response_length: must be >= min_response_length and >= 1, "
                             f"got {self.max_response_length}")
        if self.length_unit not in ("chars", "tokens"):
            raise ValueError(f"filter.length_unit: expected 'chars' or 'tokens', got {self.length_unit!r}")
        if self.vas_metric not in ("normalized", "raw", *METRICS):
            raise ValueError(f"filter.vas_metric: expected 'normalized', 'raw' or one of {list(METRICS)}, "
                             f"got {self.vas_metric!r}")
        if self.vas_threshold is not None and self.vas_quantile is not None:
            raise ValueError("filter.vas_threshold and filter.vas_quantile are exclusive; set one of them")
        if self.vas_quantile is not None and not 0.0 < self.vas_quantile <= 1.0:
            raise ValueError(f"filter.vas_quantile: must be in (0, 1], got {self.vas_quantile}")
        if self.vas_threshold is not None and self.vas_threshold < 0:
            raise ValueError(f"filter.vas_threshold: must be >= 0, got {self.vas_threshold}")
        if not 0.0 < self.near_duplicate_threshold <= 1.0:
            raise ValueError(f"filter.near_duplicate_threshold: must be in (0, 1], got {self.near_duplicate_threshold}")

    def vas_criterion(self) -> str:
        if self.vas_threshold is not None:
            return "threshold"
        return "quantile" if self.vas_quantile is not None else "none"


def response_length(response: str, unit: str) -> int:
    return len(response.split()) if unit == "tokens" else len(response)


def vas_value(record: dict, metric: str) -> float | None:
    vas = record.get("vas")
    if isinstance(vas, dict) and "." in metric:
        return view_value(vas, metric)
    value = vas.get(metric) if isinstance(vas, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None  # NaN would pass every comparison: treat it as missing
    return float(value)


def upper_quantile_threshold(values: Iterable[float], keep_fraction: float) -> float | None:
    """The smallest value among the top ``keep_fraction`` of ``values`` (None when empty).

    Keeping ``v >= threshold`` then keeps ceil(q * n) samples, more only when ties sit at the cut.
    """
    ordered = sorted(values, reverse=True)
    if not ordered:
        return None
    n_keep = min(len(ordered), max(1, math.ceil(keep_fraction * len(ordered) - 1e-9)))
    return ordered[n_keep - 1]


def stateless_failure(record: dict, cfg: FilterConfig) -> tuple[str, str, str, str] | None:
    """(failed step, reason, message, field) of the first failing check among 1-4, or None."""
    verification = record.get("verification")
    if cfg.require_correct:
        if not isinstance(verification, dict) or not isinstance(verification.get("correct"), bool):
            return ("correct", "schema_invalid", "verification.correct missing (run the verify stage first)",
                    "$.verification.correct")
        if not verification["correct"]:
            predicted = verification.get("predicted", record.get("predicted_answer"))
            gold = verification.get("gold", record.get("gold_answer"))
            method = verification.get("method", "?")
            return ("correct", "answer_wrong", f"predicted {predicted!r} != gold {gold!r} ({method})",
                    "$.verification.correct")
    response = record.get("response")
    if cfg.require_format and not format_ok(response):
        return "format", "format_invalid", "response is not <think>...</think><answer>...</answer>", "$.response"
    n_anchors = record.get("n_anchors")
    if not isinstance(n_anchors, int):
        n_anchors = len(record.get("anchors") or [])
    if n_anchors < cfg.min_anchors:
        return "anchors", "no_anchors", f"{n_anchors} anchors < min_anchors {cfg.min_anchors}", "$.n_anchors"
    length = response_length(response if isinstance(response, str) else "", cfg.length_unit)
    if length < cfg.min_response_length:
        return "length", "too_short", f"response {length} {cfg.length_unit} < {cfg.min_response_length}", "$.response"
    if cfg.max_response_length is not None and length > cfg.max_response_length:
        return "length", "too_long", f"response {length} {cfg.length_unit} > {cfg.max_response_length}", "$.response"
    return None


def duplicate_key(record: dict) -> str:
    """Exact-duplicate key: the images' sha256 and the case/whitespace-normalized question."""
    shas = sorted(str(im.get("sha256", "")) for im in record.get("images") or [])
    question = " ".join(str(record.get("question", "")).lower().split())
    return hashlib.sha256(json.dumps([shas, question]).encode("utf-8")).hexdigest()


class DuplicateGate:
    """Exact duplicates of the problem (:func:`duplicate_key`) here; text duplicates by pipeline.filtering.dedup.

    ``screen`` returns ``(reason, message)`` for a duplicate of a sample admitted earlier, else
    admits the sample and returns None: the first of every duplicate group is kept.
    """

    def __init__(self, config: FilterConfig):
        self.seen: dict[str, str] = {}
        self.index = Deduplicator(DedupConfig(threshold=config.near_duplicate_threshold,
                                              fields=list(config.dedup_fields),
                                              same_images_only=config.dedup_same_images_only))

    def screen(self, record: dict) -> tuple[str, str] | None:
        key = duplicate_key(record)
        if key in self.seen:
            return "exact_duplicate", f"same images and question as {self.seen[key]}"
        hit = self.index.check(record)
        if hit is not None:
            return hit.reason, f"duplicates {hit} ({'/'.join(self.index.config.fields)} similarity {hit.similarity})"
        self.index.add(record)
        self.seen[key] = str(record.get("id"))
        return None


class FilterStage:
    """The filter as an executor stage (``name`` + ``run(batch)``); stateful: feed each record once.

    ``vas_threshold`` is the resolved cut (from the config's threshold, or the quantile over the
    run's candidates, see :func:`resolve_vas_threshold`); None means no VAS criterion.
    """

    name = STAGE
    schema = "sample"
    scope = "global"  # reads the whole input stage at once (quantile, dedup); see run_global
    requires = ("verification", "response", "n_anchors", "vas")
    produces = ()

    @classmethod
    def run_global(cls, config, store: WorkStore, input_stage: str, upstream_stages: Iterable[str]) -> Funnel:
        """The filter step of a synthesis run (``config``: the run's SynthConfig)."""
        return run_filter(config.filter, store, inputs_stage=input_stage, output_stage=cls.name,
                          shard_size=config.run.shard_size, progress=config.run.progress,
                          upstream_stages=upstream_stages)

    def __init__(self, config: FilterConfig, vas_threshold: float | None = None,
                 gate: DuplicateGate | None = None):
        self.config = config
        self.vas_threshold = vas_threshold
        # With a VAS criterion every kept sample needs a VAS, even when the quantile found no
        # candidate to resolve a cut from.
        self.vas_required = vas_threshold is not None or config.vas_criterion() != "none"
        if gate is None and config.dedup:
            gate = DuplicateGate(config)
        self.gate = gate
        self.steps = dict.fromkeys(STEPS, 0)
        self.rejects: dict[str, int] = {}
        self.vas_info: dict = {"criterion": "none", "threshold": vas_threshold}
        self.usage: dict[str, dict] = {}
        self.candidate_vas: dict[str, list[float]] = {"raw": [], "normalized": [], config.vas_metric: []}
        self.separation = ControlSeparation()

    def check(self, record: dict) -> Reject | None:
        """Run all checks on one record; None means kept. Counts into the funnel."""
        tally_usage(self.usage, record)
        self.separation.add(record)
        found = stateless_failure(record, self.config)
        if found is None:
            for metric, values in self.candidate_vas.items():
                value = vas_value(record, metric)
                if value is not None:
                    values.append(value)
        if found is None and self.vas_required:
            metric = self.config.vas_metric
            value = vas_value(record, metric)
            if value is None:
                found = "vas", "schema_invalid", f"vas.{metric} missing or not finite", f"$.vas.{metric}"
            elif self.vas_threshold is not None and value < self.vas_threshold:
                found = "vas", "vas_below_threshold", f"vas.{metric} {value:.4g} < {self.vas_threshold:.4g}", f"$.vas.{metric}"
        if found is None:
            duplicate = self.gate.screen(record) if self.gate is not None else None
            if duplicate is not None:
                found = "unique", duplicate[0], duplicate[1], "$.question"
        failed_step = found[0] if found else None
        for step in STEPS:
            if step == failed_step:
                break
            self.steps[step] += 1
        if found is None:
            return None
        _, reason, message, where = found
        self.rejects[reason] = self.rejects.get(reason, 0) + 1
        return Reject(id=str(record.get("id") or "unknown"), stage=STAGE, reason=reason, message=message,
                      field=where, source=record.get("source"))

    def run(self, batch: list[dict]) -> list[dict | Reject]:
        return [self.check(rec) or rec for rec in batch]

    def funnel(self) -> Funnel:
        vas = dict(self.vas_info, histograms={m: histogram(v) for m, v in self.candidate_vas.items() if v},
                   quantiles={m: quantile_summary(v) for m, v in self.candidate_vas.items() if v},
                   controls=self.separation.table())
        return Funnel(steps=dict(self.steps), rejects=dict(sorted(self.rejects.items())), vas=vas,
                      usage={k: dict(v) for k, v in self.usage.items()})


def resolve_vas_threshold(config: FilterConfig, records: Iterable[dict]) -> tuple[float | None, dict]:
    """The VAS cut for this run and a summary for the card.

    With ``vas_quantile``, streams ``records`` once keeping only the VAS floats of candidates (the
    samples that pass checks 1-4). ``records`` is not read for a fixed threshold or no criterion.
    """
    info = {"criterion": config.vas_criterion(), "metric": config.vas_metric,
            "threshold": config.vas_threshold, "quantile": config.vas_quantile, "resolved_threshold": None}
    if config.vas_threshold is not None:
        info["resolved_threshold"] = config.vas_threshold
        return config.vas_threshold, info
    if config.vas_quantile is None:
        return None, info
    values = []
    for rec in records:
        if stateless_failure(rec, config) is None:
            value = vas_value(rec, config.vas_metric)
            if value is not None:
                values.append(value)
    threshold = upper_quantile_threshold(values, config.vas_quantile)
    info.update(resolved_threshold=threshold, n_candidates=len(values))
    if values:
        info.update(candidates_min=min(values), candidates_median=statistics.median(values), candidates_max=max(values))
    return threshold, info


def filter_records(config: FilterConfig, records: Callable[[], Iterable[dict]],
                   progress: bool = False) -> tuple[Iterable[dict | Reject], FilterStage]:
    """Stream ``records()`` through the filter: yields kept dicts and Rejects; the stage holds the counts.

    ``records`` is a zero-argument callable returning a fresh iterator (called twice with a
    VAS quantile: once for the VAS floats, once to filter).
    """
    threshold, info = resolve_vas_threshold(config, records() if config.vas_quantile is not None else ())
    stage = FilterStage(config, vas_threshold=threshold)
    stage.vas_info = info

    def stream():
        for rec in tqdm(records(), desc="filter", unit="sample", disable=not progress):
            yield stage.check(rec) or rec

    return stream(), stage


def run_filter(config: FilterConfig, store: WorkStore, inputs_stage: str = "vas", output_stage: str = STAGE,
               shard_size: int = 256, progress: bool = True,
               upstream_stages: Iterable[str] | None = None) -> Funnel:
    """Filter all results of ``inputs_stage`` into stage ``output_stage``; write ``funnel.json``.

    An input stage without results (every sample rejected upstream) gives an empty output and a
    funnel of zeros, not an error: the funnel is what says why. The filter is global (quantile,
    dedup), so the output stage is rebuilt from scratch each run
    in a sibling folder and swapped in; a run killed midway leaves the previous output intact.
    ``upstream_stages`` orders the per-stage summary of the funnel (the pipeline's order).
    """
    source = StageStore(store.root, inputs_stage)  # no results at all is a run with an empty funnel
    building = store.root / f".{output_stage}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    out = StageStore(building.parent, building.name)
    stream, stage = filter_records(config, source.iter_records, progress=progress)
    kept, rejects = [], []
    try:
        for item in stream:
            (rejects if isinstance(item, Reject) else kept).append(item)
            if len(kept) + len(rejects) >= shard_size:
                out.write(kept, rejects)
                kept, rejects = [], []
        out.write(kept, rejects)
        _swap_dir(building, store.root / output_stage)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    funnel = stage.funnel()
    funnel.upstream = store_summary(store, upstream_stages, exclude=(output_stage,))
    funnel.config = asdict(config)
    funnel.write(store.root / FUNNEL_FILE)
    return funnel


def _swap_dir(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
