"""Which pipeline object does each step of a synthesis run, built from a ``SynthConfig``.

No Prefect here: ``flows/synth.py`` calls these from tasks, ``bench/flow.py`` calls them in a
plain loop to measure the orchestration overhead. Every function takes the declared pipeline
(:mod:`pipeline.plan`; default: the standard one) and works on one partition of the ids at a
time: the task for shard k reads only partition k of its input stage. Pipeline modules that
load torch or transformers are imported by the stages themselves, on first use, so a config
error is reported before they load.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from flows.config import StagesConfig, SynthConfig
from pipeline.configio import to_dict
from pipeline.executor import TRANSIENT_REASONS, StageReport, run_stage
from pipeline.ids import stable_hash
from pipeline.plan import Plan, plan_of
from pipeline.store import Partition, WorkStore
from pipeline.synthesis.batch.runner import BatchesPending
from pipeline.synthesis.vllm_server import VLLMServer, serving

STAGE_NAMES_WITH_TEACHERS = tuple(f.name for f in fields(StagesConfig))
USAGE_KEYS = ("requests", "failures", "prompt_tokens", "completion_tokens", "cache_hits", "cost_usd")


class StagePool:
    """One stage instance per (stage, config digest) per process, used by one batch at a time.

    Instances hold expensive state (a loaded reference model, an HTTP client bound to an event
    loop), so tasks in one process share them; the lock serialises ``run`` because neither a
    model under an attention lens nor an event-loop-bound client tolerates concurrent use.
    Parallelism comes from the stage's own concurrency and, on Ray, from several processes.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}

    def get(self, stage_cls: type, config: SynthConfig) -> tuple[Any, threading.Lock]:
        key = (f"{stage_cls.__module__}.{stage_cls.__qualname__}", stable_hash(to_dict(config)))
        with self._lock:
            if key not in self._items:
                self._items[key] = (stage_cls.from_config(config), threading.Lock())
            return self._items[key]

    def __enter__(self) -> StagePool:  # noqa: PYI034 - a singleton, never subclassed
        return self

    def __exit__(self, *exc) -> None:  # the stages built in this process (thread runner)
        self.close()

    def close(self) -> None:
        with self._lock:
            items, self._items = list(self._items.values()), {}
        for stage, _ in items:
            if hasattr(stage, "close"):
                stage.close()


STAGE_POOL = StagePool()


def preflight(config: SynthConfig, plan: Plan | None = None) -> list[str]:
    """Check every stage that can be checked before any work (teacher endpoints serve the model
    and fit max_tokens; the VAS model can be found); raises on the first problem, naming the
    config key. Returns the names of the stages checked."""
    checked = []
    for stage_cls in plan_of(plan).of_scope("shard"):
        if not hasattr(stage_cls, "preflight"):
            continue
        stage, lock = STAGE_POOL.get(stage_cls, config)
        with lock:
            stage.preflight()
        checked.append(stage_cls.name)
    return checked


def served_teachers(config: SynthConfig) -> dict[str, Any]:
    """Stage name -> teacher config, for the teachers that need a managed vLLM server (``serve``
    in mode online; in mode batch vLLM's offline engine runs per batch instead)."""
    return {name: teacher for name in STAGE_NAMES_WITH_TEACHERS
            if (teacher := getattr(config.stages, name).teacher).serve is not None and teacher.mode == "online"}


def has_managed_servers(config: SynthConfig) -> bool:
    return bool(served_teachers(config))


@contextlib.contextmanager
def managed_servers(config: SynthConfig, log_dir: Path) -> Iterator[SynthConfig]:
    """Start the vLLM servers that teachers with ``serve`` in mode online ask for (one per
    distinct server and model), yield ``config`` with those teachers' ``base_url`` pointing at them, stop them all
    at the end. A config without ``serve`` passes through unchanged."""
    wanted: dict[str, list[str]] = {}  # server identity -> stage names
    teachers = {}
    for name, teacher in served_teachers(config).items():
        identity = stable_hash({"serve": asdict(teacher.serve), "model": teacher.model})
        wanted.setdefault(identity, []).append(name)
        teachers.setdefault(identity, teacher)
    servers = {identity: VLLMServer(teacher.serve, teacher.model,  # <store>/logs/vllm-reason-anchor.log
                                    log_dir / f"vllm-{'-'.join(wanted[identity])}.log")
               for identity, teacher in teachers.items()}
    if not servers:
        yield config
        return
    with serving(list(servers.values())) as urls:
        stages = config.stages
        for identity, url in zip(servers, urls, strict=True):
            for name in wanted[identity]:
                stage = getattr(stages, name)
                stages = replace(stages, **{name: replace(stage, teacher=replace(stage.teacher, base_url=url))})
        yield replace(config, stages=stages)


def batch_state_path(config: SynthConfig) -> Path | None:
    """The SQLite holding the run's batch jobs, when a teacher runs in mode batch."""
    if any(getattr(config.stages, name).teacher.mode == "batch" for name in STAGE_NAMES_WITH_TEACHERS):
        return config.run.request_cache_path()
    return None


def run_seeds(config: SynthConfig, plan: Plan | None = None,
              progress: Callable[[int], None] | None = None) -> dict:
    """Write the seed stream into the source stage, each record into its id's partition."""
    plan = plan_of(plan)
    store = WorkStore(config.run.store_dir)
    started = time.time()
    source = plan.source.from_config(config)
    report = run_stage(source, store.stage(source.name), source.source(),
                       shard_size=config.run.shard_size, progress=progress, route=config.run.n_shards)
    return _report(report, started)


def run_shard(name: str, shard: int, config: SynthConfig, plan: Plan | None = None,
              progress: Callable[[int], None] | None = None,
              on_batch: Callable[[StageReport], None] | None = None) -> dict:
    """Run stage ``name`` over partition ``shard`` of its input stage's results."""
    plan = plan_of(plan)
    store = WorkStore(config.run.store_dir)
    partition = Partition(shard, config.run.n_shards)
    source = store.stage(plan.input_of(name))
    started = time.time()
    stage, lock = STAGE_POOL.get(plan.get(name), config)
    batched: dict | None = None
    try:
        if getattr(stage, "batch_mode", False):  # outside the lock: shards' batches run together
            done = store.stage(name).done_ids(TRANSIENT_REASONS, partition)
            batched = stage.prefetch(lambda: (r for r in source.iter_records(partition) if r["id"] not in done),
                                     shard)
        with lock:
            before = _usage(stage)
            report = run_stage(stage, store.stage(name), source.iter_records(partition),
                               shard_size=config.run.shard_size, progress=progress, partition=partition,
                               on_batch=on_batch)
            after = _usage(stage)
    except BatchesPending as pending:  # --no-wait: submitted; a re-run collects
        return {**_report(StageReport(name), started), "shard": shard,
                "batch_pending": len(pending.jobs), "batch_message": str(pending)}
    out = _report(report, started)
    if after is not None:
        out["usage"] = {k: round(after[k] - before[k], 6) if k == "cost_usd" else after[k] - before[k]
                        for k in USAGE_KEYS}
        if batched is not None:
            out["usage"] = {k: round(out["usage"][k] + batched[k], 6) for k in USAGE_KEYS}
    return {**out, "shard": shard}


def _usage(stage: Any) -> dict | None:
    """Teacher stages count what they send; others have no usage."""
    summary = getattr(stage, "usage_summary", None)
    return summary() if summary is not None else None


def run_filter(config: SynthConfig, plan: Plan | None = None) -> dict:
    """Run the global stages (the filter) over the whole store; returns the funnel (JSON-able)."""
    plan = plan_of(plan)
    store = WorkStore(config.run.store_dir)
    started = time.time()
    funnel: dict = {}
    for stage in plan.of_scope("global"):
        funnel = stage.run_global(config, store, plan.input_of(stage.name), plan.names).to_dict()
    return {"funnel": funnel, "started": started, "finished": time.time()}


def run_publish(config: SynthConfig, funnel: dict, plan: Plan | None = None) -> dict:
    """Publish the last stage's results and regenerate the data card; paths for the artifact."""
    from pipeline.publishing.publish import publish

    plan = plan_of(plan)
    store = WorkStore(config.run.store_dir)
    started = time.time()
    result = publish(config.publish, store.stage(plan.last).iter_records(), funnel=funnel,
                     provenance=provenance(config), progress=config.run.progress)
    out = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    out.pop("files", None)  # the folder listing is long and lives on disk
    return {**out, "started": started, "finished": time.time()}


def run_local(config: SynthConfig, plan: Plan | None = None,
              after_stage: Callable[[str], None] | None = None) -> dict:
    """The whole run in this process, one task after another, without Prefect (benchmarks, tests):
    seeds, every shard of every per-shard stage, the filter, publish. Returns the funnel."""
    plan = plan_of(plan)
    try:
        run_seeds(config, plan)
        if after_stage is not None:
            after_stage(plan.source.name)
        for stage in plan.of_scope("shard"):
            for shard in range(config.run.n_shards):
                run_shard(stage.name, shard, config, plan)
            if after_stage is not None:
                after_stage(stage.name)
        funnel = run_filter(config, plan)["funnel"]
        if after_stage is not None:
            after_stage("filter")
        run_publish(config, funnel, plan)
        if after_stage is not None:
            after_stage("publish")
        return funnel
    finally:
        STAGE_POOL.close()


def provenance(config: SynthConfig) -> dict:
    """What a dataset records about the run that made it (no secrets: configs hold none), and
    what the learned reference model measured of itself when it scored the run."""
    from pipeline.vlm.reference import reference_summary  # torch: only when publishing

    out = {"config_digest": config.digest(), "config": {k: v for k, v in to_dict(config).items() if k != "run"}}
    reference = reference_summary(config.vas.model)
    if reference is not None:
        out["vas_reference"] = reference
    return out


def _report(report: StageReport, started: float) -> dict:
    return {**asdict(report), "started": started, "finished": time.time(), "pid": os.getpid()}
