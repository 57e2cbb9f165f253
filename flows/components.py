"""Which pipeline object does each step of a synthesis run, built from a ``SynthConfig``.

No Prefect here: ``flows/synth.py`` calls these from tasks, ``bench/flow.py`` calls them in a
plain loop to measure the orchestration overhead. Pipeline modules are imported lazily so a
config error is reported before torch/transformers load.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.config import SynthConfig, to_dict
from pipeline.executor import StageReport, run_stage
from pipeline.ids import stable_hash
from pipeline.records import Reject
from pipeline.store import WorkStore

# Per-shard stages in order; each reads the results of the one before ("seeds" first).
SHARD_STAGES = ("describe", "reason", "anchor", "verify", "vas")
INPUT_OF = {"describe": "seeds", "reason": "describe", "anchor": "reason", "verify": "anchor",
            "vas": "verify"}


class SeedSource:
    """Adapter so the seed stream goes through ``run_stage`` like any stage (done ids skipped,
    records validated against the seed schema, one atomic shard per batch).

    ``iter_seeds`` yields records and Rejects; a Reject travels wrapped as ``{"id", "reject"}``
    because the executor keys its input stream by ``id``.
    """

    name = "seeds"

    @staticmethod
    def wrap(items: Iterable[dict | Reject]) -> Iterator[dict]:
        for item in items:
            yield {"id": item.id, "reject": item} if isinstance(item, Reject) else item

    def run(self, batch: list[dict]) -> list[dict | Reject]:
        return [item["reject"] if isinstance(item.get("reject"), Reject) else item for item in batch]


def build_stage(name: str, config: SynthConfig) -> Any:
    """The executor Stage for ``name`` (describe | reason | anchor | verify | vas)."""
    if name in ("describe", "reason", "anchor"):
        from pipeline.stages import build_stage as build_teacher_stage
        # One SQLite request cache for the three stages: the key includes the stage.
        return build_teacher_stage(name, getattr(config.stages, name),
                                   cache=config.run.request_cache_path(), progress=False)
    if name == "verify":
        from pipeline.verify import VerifyStage
        return VerifyStage()
    if name == "vas":
        from pipeline.vas import VASStage
        return VASStage(config.vas)
    raise ValueError(f"unknown stage {name!r}; expected one of {SHARD_STAGES}")


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

    def get(self, name: str, config: SynthConfig) -> tuple[Any, threading.Lock]:
        key = (name, stable_hash(to_dict(config)))
        with self._lock:
            if key not in self._items:
                self._items[key] = (build_stage(name, config), threading.Lock())
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


def shard_of(sample_id: str, n_shards: int) -> int:
    """Partition by id hash: stable across runs, whatever order the seeds arrive in."""
    return int(sample_id[:8], 16) % n_shards


def run_seeds(config: SynthConfig, progress: Callable[[int], None] | None = None) -> dict:
    """Write the seed stream into the store's "seeds" stage; return its report and id shards."""
    from pipeline.seeds import iter_seeds
    store = WorkStore(config.run.store_dir)
    started = time.time()
    report = run_stage(SeedSource(), store.stage("seeds"), SeedSource.wrap(iter_seeds(config.seeds)),
                       shard_size=config.run.shard_size, progress=progress)
    shards: list[list[str]] = [[] for _ in range(config.run.n_shards)]
    for sample_id in sorted(result_ids(store, "seeds")):
        shards[shard_of(sample_id, config.run.n_shards)].append(sample_id)
    return {**_report(report, started), "shards": shards}


def result_ids(store: WorkStore, stage: str) -> set[str]:
    """Ids with a result (not a reject) in ``stage``."""
    import pyarrow.parquet as pq
    out: set[str] = set()
    for shard in store.stage(stage).shards():
        table = pq.read_table(shard, columns=["id", "kind"])
        out.update(i for i, k in zip(table.column("id").to_pylist(), table.column("kind").to_pylist())
                   if k == "result")
    return out


def run_shard(name: str, ids: list[str], config: SynthConfig,
              progress: Callable[[int], None] | None = None) -> dict:
    """Run stage ``name`` over the records of one id shard, from the previous stage's results."""
    store = WorkStore(config.run.store_dir)
    wanted = set(ids)
    inputs = (rec for rec in store.stage(INPUT_OF[name]).iter_records() if rec["id"] in wanted)
    started = time.time()
    stage, lock = STAGE_POOL.get(name, config)
    with lock:
        report = run_stage(stage, store.stage(name), inputs, shard_size=config.run.shard_size,
                           progress=progress)
    return _report(report, started)


def run_filter(config: SynthConfig) -> dict:
    """Filter the VAS-scored samples over the whole store; returns the funnel (JSON-able)."""
    from pipeline.filter import run_filter as filter_store
    store = WorkStore(config.run.store_dir)
    started = time.time()
    funnel = filter_store(config.filter, store, inputs_stage="vas", shard_size=config.run.shard_size,
                          progress=config.run.progress).to_dict()
    return {"funnel": funnel, "started": started, "finished": time.time()}


def run_publish(config: SynthConfig, funnel: dict) -> dict:
    """Publish the kept samples and regenerate the data card; returns paths for the artifact."""
    from pipeline.publish import publish
    store = WorkStore(config.run.store_dir)
    started = time.time()
    result = publish(config.publish, store.stage("filter").iter_records(), funnel=funnel,
                     provenance=provenance(config), progress=config.run.progress)
    out = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    out.pop("files", None)  # the folder listing is long and lives on disk
    return {**out, "started": started, "finished": time.time()}


def provenance(config: SynthConfig) -> dict:
    """What a dataset records about the run that made it (no secrets: configs hold none)."""
    return {"config_digest": config.digest(),
            "config": {k: v for k, v in to_dict(config).items() if k != "run"}}


def _report(report: StageReport, started: float) -> dict:
    return {**asdict(report), "started": started, "finished": time.time(), "pid": os.getpid()}
