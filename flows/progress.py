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
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

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


def tally_row(stage: str, tally: StageTally, n_shards: int) -> dict:
    """One row of the live table, with the labels a person reads in the UI; narrow enough that
    the cost column is on screen in a 1400 px wide window."""
    return {"Stage": stage, "Shards": f"{tally.shards_done}/{n_shards}",
            "Results": tally.results + tally.done_before, "Rejects": tally.rejects,
            "Top reject reasons": top_reasons(tally.reasons),
            "Tokens in / out": f"{tally.prompt_tokens:,} / {tally.completion_tokens:,}",
            "Cost (USD)": f"{tally.cost_usd:.4f}"}


class RunProgress:
    """Counts of the shards finished so far, published to Prefect and the console."""

    def __init__(self, stages: Iterable[str], n_shards: int, logger: logging.Logger | None = None,
                 artifacts: bool = True):
        self.stages, self.n_shards = list(stages), n_shards
        self.tallies = {stage: StageTally() for stage in self.stages}
        self.logger = logger or logging.getLogger(__name__)
        self.artifacts = artifacts
        self._lock = threading.Lock()
        self._progress_ids: dict[str, object] = {}

    @property
    def total_shards(self) -> int:
        return self.n_shards * len(self.stages)

    @property
    def finished_shards(self) -> int:
        return sum(t.shards_done for t in self.tallies.values())

    def rows(self) -> list[dict]:
        return [tally_row(stage, self.tallies[stage], self.n_shards) for stage in self.stages]

    def start(self) -> None:
        """Create the artifacts at 0 % so the UI shows the run's shape from its first second."""
        if not self.artifacts:
            return
        from prefect.artifacts import create_progress_artifact
        for stage in self.stages:
            self._progress_ids[stage] = create_progress_artifact(
                0.0, key=progress_key(stage), description=f"{stage}: shards finished")
        self._publish_table()

    def update(self, stage: str, report: dict) -> None:
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
