"""Run a stage over a stream of records into the work store: skip done ids, batch, validate.

Stages (datatrove-style) are small objects with one ``run(batch)`` method that returns, per
input record, the updated record (dict) or a :class:`Reject`; they declare ``name``, the record
``schema`` their outputs follow ("seed" or "sample") and the fields they ``produce`` (see
:mod:`pipeline.plan`). Execution is separate: this module does batching, resumability, routing
into partitions and the records contract; ``flows/`` adds Prefect.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.records import RecordError, Reject, validate_output
from pipeline.store import Partition, StageStore, shard_of

# Reject reasons that say "the teacher was unavailable", not "the record is bad": re-runs retry them.
TRANSIENT_REASONS = frozenset({"teacher_failed", "teacher_timeout", "teacher_rate_limited",
                               "teacher_malformed"})


class Stage(Protocol):
    name: str
    schema: str
    produces: tuple[str, ...]

    def run(self, batch: list[dict]) -> list[dict | Reject]: ...


@dataclass
class StageReport:
    """What one ``run_stage`` call did (JSON-able through ``dataclasses.asdict``)."""

    stage: str
    seen: int = 0
    skipped: int = 0
    results: int = 0
    rejects: int = 0
    shards: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # reject reasons of this call


def check_output(stage: Stage, out: dict | Reject) -> dict | Reject:
    """The boundary check: a result must satisfy the stage's schema and the fields it produces."""
    if isinstance(out, Reject):
        return out
    try:
        validate_output(getattr(stage, "schema", "sample"), out, getattr(stage, "produces", ()), stage.name)
    except RecordError as err:
        return Reject.from_error(stage.name, err, source=out.get("source") if isinstance(out, dict) else None)
    return out


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def pending(inputs: Iterable[dict | Reject], done: set[str], report: StageReport) -> Iterator[dict | Reject]:
    """Inputs whose id has no result or reject yet (first occurrence of an id only)."""
    for item in inputs:
        report.seen += 1
        rid = item.id if isinstance(item, Reject) else item.get("id")
        if rid in done:
            report.skipped += 1
            continue
        done.add(rid)
        yield item


class _Writer:
    """Commits checked outputs: one file per batch into one partition, or, when routing by id
    (``route``: the partition count), per partition once it holds ``shard_size`` records."""

    def __init__(self, out: StageStore, shard_size: int, partition: Partition | None, route: int | None):
        self.out, self.shard_size, self.partition, self.route = out, shard_size, partition, route
        self.buffers: dict[Partition, tuple[list, list]] = {}
        self.files = 0

    def add(self, results: list[dict], rejects: list[Reject]) -> None:
        if self.route is None:
            self.files += self.out.write(results, rejects, self.partition) is not None
            return
        for item in (*results, *rejects):
            rid = item.id if isinstance(item, Reject) else item["id"]
            part = Partition(shard_of(rid, self.route), self.route)
            kept, rejected = self.buffers.setdefault(part, ([], []))
            (rejected if isinstance(item, Reject) else kept).append(item)
            if len(kept) + len(rejected) >= self.shard_size:
                self._flush(part)

    def _flush(self, part: Partition) -> None:
        kept, rejected = self.buffers.pop(part)
        self.files += self.out.write(kept, rejected, part) is not None

    def close(self) -> None:
        for part in sorted(self.buffers, key=lambda p: p.index):
            self._flush(part)


def run_stage(stage: Stage, out: StageStore, inputs: Iterable[dict | Reject], shard_size: int = 256,
              progress: Callable[[int], None] | None = None,
              retry_reasons: Iterable[str] = TRANSIENT_REASONS, partition: Partition | None = None,
              route: int | None = None, on_batch: Callable[[StageReport], None] | None = None) -> StageReport:
    """Run ``stage`` over ``inputs`` not yet in ``out`` (in ``partition``, or anywhere).

    ``inputs`` may carry :class:`Reject` items (a source that already decided a row cannot be a
    record): they are stored as they are. Records rejected earlier for a transient reason
    (``retry_reasons``: a teacher that timed out or kept failing) are tried again; the request
    cache makes that free for what already succeeded. Outputs go to ``partition``, or with
    ``route=n`` to the partition of each id among ``n`` (the source stage). ``progress(n)`` is
    called with the inputs of each finished batch, ``on_batch(report)`` after each commit.
    """
    if partition is not None and route is not None:
        raise ValueError("give either partition or route, not both")
    report = StageReport(stage.name)
    done = out.done_ids(retry_reasons, partition)
    writer = _Writer(out, shard_size, partition, route)
    reasons: Counter[str] = Counter()
    for batch in batched(pending(inputs, done, report), shard_size):
        records = [item for item in batch if not isinstance(item, Reject)]
        outputs = stage.run(records) if records else []
        if len(outputs) != len(records):
            raise RuntimeError(f"stage {stage.name} returned {len(outputs)} outputs for {len(records)} inputs")
        outputs += [item for item in batch if isinstance(item, Reject)]
        results, rejects = [], []
        for item in outputs:
            checked = check_output(stage, item)
            (rejects if isinstance(checked, Reject) else results).append(checked)
        writer.add(results, rejects)
        reasons.update(r.reason for r in rejects)
        report.results += len(results)
        report.rejects += len(rejects)
        report.reasons = dict(sorted(reasons.items()))
        if progress is not None:
            progress(len(batch))
        if on_batch is not None:
            on_batch(report)
    writer.close()
    report.shards = writer.files
    return report
