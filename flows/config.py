"""The synthesis run's configuration: one YAML file (``configs/*.yaml``) -> :class:`SynthConfig`.

It composes the config dataclasses each pipeline module declares beside its code (seeds, the
teacher stages, VAS, filter, publish) and adds :class:`RunConfig`, how the run executes (work
store, shards, task runner, retries), which never changes the data. It lives beside the flow,
above the pipeline: no pipeline module imports it. Loading is strict and validated before any
work (see :mod:`pipeline.configio`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.configio import config_digest, load
from pipeline.filtering.filter import FilterConfig
from pipeline.publishing.publish import PublishConfig
from pipeline.seeds.config import SeedsConfig
from pipeline.synthesis.stages import StageConfig
from pipeline.vas import VASConfig


@dataclass
class RunConfig:
    """How a synthesis run executes. None of it changes the data (all volatile for the digest)."""

    store_dir: str = field(default="runs/demo", metadata={
        "help": "Work store root (parquet shards per stage, request cache, funnel). Re-running with "
                "the same store continues where a previous run stopped.", "volatile": True})
    cache_path: str | None = field(default=None, metadata={
        "help": "Teacher request cache (SQLite). Default: <store_dir>/requests.sqlite.", "volatile": True})
    shard_size: int = field(default=64, metadata={
        "help": "Records per stage batch and per parquet shard (a crash loses at most one batch "
                "per running task).", "volatile": True})
    n_shards: int = field(default=4, metadata={
        "help": "Seed ids are split into this many partitions (by id hash); each stage runs one "
                "Prefect task per partition.", "volatile": True})
    runner: Literal["thread", "ray"] = field(default="thread", metadata={
        "help": "Task runner: 'thread' (Prefect ThreadPoolTaskRunner, one process) or 'ray' "
                "(prefect-ray RayTaskRunner; needs the `ray` extra).", "volatile": True})
    max_workers: int = field(default=4, metadata={
        "help": "Thread runner: tasks in flight at once. One stage instance per process runs one "
                "batch at a time; the stages' own concurrency (teacher max_concurrency, VAS batch "
                "size) works inside a task.", "volatile": True})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray runner: cluster address ('auto', 'ray://head:10001'); None starts a local "
                "Ray unless RAY_ADDRESS is set.", "volatile": True})
    ray_num_cpus: int | None = field(default=None, metadata={
        "help": "Ray runner, local Ray only: CPUs it may use (None: all).", "volatile": True})
    ray_remote_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "Ray runner: per-stage ray.remote options, e.g. {vas: {num_gpus: 1}} (Ray then "
                "limits each stage's concurrency by resources).", "volatile": True})
    task_retries: int = field(default=2, metadata={
        "help": "Prefect retries per task (a retried task skips ids already done).", "volatile": True})
    retry_delay_s: float = field(default=5.0, metadata={
        "help": "Seconds between Prefect task retries.", "volatile": True})
    progress: bool = field(default=True, metadata={
        "help": "Show per-task progress bars (tqdm, stderr).", "volatile": True})
    batch_wait: bool = field(default=True, metadata={
        "help": "Teachers in mode batch: wait for their batches (true), or submit them and stop "
                "(false, `--no-wait`: exit code 4 while batches run; re-running the same config "
                "collects what finished).", "volatile": True})

    def __post_init__(self):
        for name in ("shard_size", "n_shards", "max_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.task_retries < 0 or self.retry_delay_s < 0:
            raise ValueError("task_retries and retry_delay_s: must be >= 0")

    def request_cache_path(self) -> Path:
        return Path(self.cache_path) if self.cache_path else Path(self.store_dir) / "requests.sqlite"


@dataclass
class StagesConfig:
    """The three teacher stages (SPEC VARD), each with its own teacher, prompt and sampling."""

    describe: StageConfig = field(default_factory=StageConfig, metadata={
        "help": "Structured image description (paper teacher: Gemini-2.5-Pro)."})
    reason: StageConfig = field(default_factory=StageConfig, metadata={
        "help": "Long chain of thought with self-reflection (paper teacher: Qwen3-235B-A22B)."})
    anchor: StageConfig = field(default_factory=StageConfig, metadata={
        "help": "Rewrite that returns to the image at visual steps (paper teacher: Qwen3-32B)."})


@dataclass
class SynthConfig:
    """Everything a synthesis run needs; one YAML file (configs/*.yaml)."""

    run: RunConfig = field(default_factory=RunConfig, metadata={
        "help": "Execution: work store, shards, task runner, retries (does not change the data)."})
    seeds: SeedsConfig = field(default_factory=SeedsConfig, metadata={
        "help": "Where seed problems come from (procedural generator, local dataset, Hub)."})
    stages: StagesConfig = field(default_factory=StagesConfig, metadata={
        "help": "Teacher stages describe, reason, anchor."})
    vas: VASConfig = field(default_factory=VASConfig, metadata={
        "help": "Per-sample response VAS on the reference model."})
    filter: FilterConfig = field(default_factory=FilterConfig, metadata={
        "help": "Which samples are kept (correct, format, anchors, length, VAS, dedup)."})
    publish: PublishConfig = field(default_factory=PublishConfig, metadata={
        "help": "Where and how the dataset and its data card are written (and pushed)."})

    def __post_init__(self):
        if self.stages.describe.teacher.modality == "text":
            raise ValueError("stages.describe.teacher.modality: describe writes what the image shows; "
                             "its teacher must read the images (vision, a VLM)")

    def digest(self) -> str:
        """Provenance digest: the output-relevant settings only."""
        return config_digest(self)


def load_synth_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> SynthConfig:
    """Load, override and validate a synthesis config; raises :class:`ConfigError`."""
    return load(SynthConfig, path, overrides)
