"""What a person watching a run sees while it runs: live Prefect artifacts and one console line
per finished shard.

The flow feeds :class:`RunProgress` each shard report as its task finishes (in the flow's own
process, whatever the task runner: the numbers travel in the task's return value). It keeps

- one Prefect progress artifact per stage (``avar-progress-<stage>``: shards finished / shards),
- one live table artifact ``avar-live`` (results, rejects, top reject reasons, tokens and the
  estimated cost so far, per stage), a new version after every shard,
- and one console line per shard (``[7/28 shards] reason shard 2: ...``) instead of progress bars
  from parallel tasks writing over each other.

Artifacts need a Prefect run context; :meth:`RunProgress.update` is a no-op for them without one
(``bench/``, tests that call it directly).

With teachers in ``mode: batch``, a watcher thread also reads the run's batch state (the
request cache's SQLite, read-only) every few seconds: the table gets a ``Batches`` column (each
shard's status: ``validating``, ``in progress 40/64``, ``finalizing``, ``completed``) and the
console a line whenever a shard's batch status changes.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

LIVE_KEY = "avar-live"
TOP_REASONS = 3


def progress_key(stage: str) -> str:
    return f"avar-progress-{stage}"


@dataclass
class StageTally:
    shards_done: int = 0
    results: int = 0
    rejects: int = 0
    done_before: int = 0
    reasons: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, report: dict) -> None:
        self.shards_done += 1
        self.results += int(report.get("results", 0))
        self.rejects += int(report.get("rejects", 0))
        self.done_before += int(report.get("skipped", 0))
        self.reasons.update(report.get("reasons") or {})
        usage = report.get("usage") or {}
        self.prompt_tokens += int(usage.get("prompt_tokens", 0))
        self.completion_tokens += int(usage.get("completion_tokens", 0))
        self.cost_usd += float(usage.get("cost_usd", 0.0))


def top_reasons(reasons: Counter, n: int = TOP_REASONS) -> str:
    # "none", not "-": the UI renders table cells as markdown, where "-" is a list bullet
    return ", ".join(f"{reason} ({count})" for reason, count in reasons.most_common(n)) or "none"


def tally_row(stage: str, tally: StageTally, n_shards: int, batches: str | None = None) -> dict:
    """One row of the live table, with the labels a person reads in the UI; narrow enough that
    the cost column is on screen in a 1400 px wide window. ``batches``: the stage's batch status
    (a run with batch teachers only)."""
    row = {"Stage": stage, "Shards": f"{tally.shards_done}/{n_shards}",
           "Results": tally.results + tally.done_before, "Rejects": tally.rejects,
           "Top reject reasons": top_reasons(tally.reasons),
           "Tokens in / out": f"{tally.prompt_tokens:,} / {tally.completion_tokens:,}",
           "Cost (USD)": f"{tally.cost_usd:.4f}"}
    if batches is not None:
        row["Batches"] = batches
    return row


def shard_batch_status(jobs: list) -> str:
    """One shard's batch status from its jobs (:class:`pipeline.synthesis.batch.state.Job`):
    the open jobs' statuses (``in progress`` with lines done / total), else ``completed``."""
    open_jobs = [job for job in jobs if job.status != "collected"]
    if not open_jobs:
        return "completed"
    local = {"prepared": "preparing", "uploading": "uploading", "uploaded": "uploading",
             "submitting": "submitting", "downloading": "downloading"}
    phases: Counter[str] = Counter()
    done = total = 0
    for job in open_jobs:
        phase = local.get(job.status, job.status.replace("_", " "))
        phases[phase] += 1
        if job.status in ("in_progress", "cancelling"):
            done, total = done + job.completed + job.failed, total + job.total
    return ", ".join(f"{phase} {done}/{total}" if phase == "in progress" and total else phase
                     for phase in sorted(phases))


class RunProgress:
    """Counts of the shards finished so far, published to Prefect and the console."""

    def __init__(self, stages: Iterable[str], n_shards: int, logger: logging.Logger | None = None,
                 artifacts: bool = True, batch_state: Path | None = None, watch_interval_s: float = 5.0):
        self.stages, self.n_shards = list(stages), n_shards
        self.tallies = {stage: StageTally() for stage in self.stages}
        self.logger = logger or logging.getLogger(__name__)
        self.artifacts = artifacts
        self._lock = threading.Lock()
        self._progress_ids: dict[str, object] = {}
        self.batch_state, self.watch_interval_s = batch_state, watch_interval_s
        self.batches: dict[tuple[str, int | None], str] = {}  # (stage, shard) -> status
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def total_shards(self) -> int:
        return self.n_shards * len(self.stages)

    @property
    def finished_shards(self) -> int:
        return sum(t.shards_done for t in self.tallies.values())

    def rows(self) -> list[dict]:
        return [tally_row(stage, self.tallies[stage], self.n_shards, self._batch_cell(stage))
                for stage in self.stages]

    def _batch_cell(self, stage: str) -> str | None:
        if self.batch_state is None:
            return None
        shards = sorted(((shard, status) for (s, shard), status in self.batches.items() if s == stage),
                        key=lambda item: -1 if item[0] is None else item[0])
        return "; ".join(f"shard {shard}: {status}" for shard, status in shards) or "none"

    def start(self) -> None:
        """Create the artifacts at 0 % so the UI shows the run's shape from its first second."""
        if self.batch_state is not None:  # in the flow's context, so it may write artifacts
            context = contextvars.copy_context()
            self._watcher = threading.Thread(target=context.run, args=(self._watch,),
                                             name="avar-batch-watcher", daemon=True)
            self._watcher.start()
        if not self.artifacts:
            return
        from prefect.artifacts import create_progress_artifact
        for stage in self.stages:
            self._progress_ids[stage] = create_progress_artifact(
                0.0, key=progress_key(stage), description=f"{stage}: shards finished")
        self._publish_table()

    def stop(self) -> None:
        """Stop the batch watcher (after a last look)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
            self._watcher = None

    def watch_batches_once(self) -> list[str]:
        """Read the batch state; log and publish the shards whose status changed. Returns the
        console lines it wrote."""
        from pipeline.synthesis.batch.state import read_status
        if self.batch_state is None:
            return []
        try:
            status = {key: shard_batch_status(jobs) for key, jobs in read_status(self.batch_state).items()}
        except Exception as err:  # noqa: BLE001 - watching must never stop the run
            self.logger.debug("batch watcher: %s", err)
            return []
        lines = []
        with self._lock:
            for (stage, shard), text in sorted(status.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)):
                if self.batches.get((stage, shard)) != text:
                    lines.append(f"[batches] {stage} shard {shard}: {text}")
            self.batches = status
            for line in lines:
                self.logger.info(line)
            if lines and self.artifacts:
                self._publish_table()
        return lines

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_interval_s):
            self.watch_batches_once()
        self.watch_batches_once()

    def update(self, stage: str, report: dict) -> None:
        if report.get("batch_pending"):
            self.logger.info("%s shard %s: %s", stage, report.get("shard", "?"), report.get("batch_message"))
            return
        with self._lock:
            tally = self.tallies[stage]
            tally.add(report)
            self.logger.info("[%d/%d shards] %s shard %s: %d results, %d rejects, %d done before | "
                             "%s so far: %d results, %d rejects (%s), %d+%d tokens, $%.4f",
                             self.finished_shards, self.total_shards, stage, report.get("shard", "?"),
                             report.get("results", 0), report.get("rejects", 0), report.get("skipped", 0),
                             stage, tally.results, tally.rejects, top_reasons(tally.reasons),
                             tally.prompt_tokens, tally.completion_tokens, tally.cost_usd)
            if self.artifacts:
                from prefect.artifacts import update_progress_artifact
                if stage in self._progress_ids:
                    update_progress_artifact(self._progress_ids[stage],
                                             100.0 * tally.shards_done / self.n_shards)
                self._publish_table()

    def _publish_table(self) -> None:
        from prefect.artifacts import create_table_artifact
        create_table_artifact(self.rows(), key=LIVE_KEY,
                              description=f"Live: {self.finished_shards}/{self.total_shards} shard "
                                          "tasks finished (results, rejects, tokens and cost so far)")
