"""Run a stage over a stream of records into the work store: skip done ids, shard, validate.

Stages (datatrove-style) are small objects with a ``name`` and one ``run(batch)`` method that
returns, per input record, either the updated record (dict) or a :class:`Reject`. Execution is
separate: this module does batching, resumability and validation; ``flows/`` adds Prefect.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from pipeline.records import RecordError, Reject, validate, validate_sample
from pipeline.store import StageStore

# Reject reasons that say "the teacher was unavailable", not "the record is bad": re-runs retry them.
TRANSIENT_REASONS = frozenset({"teacher_failed", "teacher_timeout", "teacher_rate_limited",
                               "teacher_malformed"})


class Stage(Protocol):
    name: str

    def run(self, batch: list[dict]) -> list[dict | Reject]: ...


@dataclass
class StageReport:
    stage: str
    seen: int = 0
    skipped: int = 0
    results: int = 0
    rejects: int = 0
    shards: int = 0


def check_output(stage_name: str, out: dict | Reject) -> dict | Reject:
    """The boundary check: a result must satisfy the sample contract for this stage."""
    if isinstance(out, Reject):
        return out
    try:
        if stage_name == "seeds":
            validate("seed", out)
        else:
            validate_sample(out, stage_name)
    except RecordError as err:
        return Reject.from_error(stage_name, err, source=out.get("source") if isinstance(out, dict) else None)
    return out


def batched(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def pending(inputs: Iterable[dict], done: set[str], report: StageReport) -> Iterator[dict]:
    """Inputs whose id has no result or reject yet (first occurrence of an id only)."""
    for rec in inputs:
        report.seen += 1
        rid = rec.get("id")
        if rid in done:
            report.skipped += 1
            continue
        done.add(rid)
        yield rec


def run_stage(stage: Stage, out: StageStore, inputs: Iterable[dict], shard_size: int = 256,
              progress=None, retry_reasons: Iterable[str] = TRANSIENT_REASONS) -> StageReport:
    """Run ``stage`` over ``inputs`` not yet in ``out``; one atomic shard per batch.

    Records rejected earlier for a transient reason (``retry_reasons``: a teacher that timed out or
    kept failing) are tried again; the request cache makes that free for what already succeeded.
    ``progress`` is an optional callable ``(n_done_in_batch) -> None`` (tqdm/rich update).
    """
    report = StageReport(stage.name)
    done = out.done_ids(retry_reasons)
    for batch in batched(pending(inputs, done, report), shard_size):
        outputs = stage.run(batch)
        if len(outputs) != len(batch):
            raise RuntimeError(f"stage {stage.name} returned {len(outputs)} outputs for {len(batch)} inputs")
        results, rejects = [], []
        for rec in outputs:
            checked = check_output(stage.name, rec)
            (rejects if isinstance(checked, Reject) else results).append(checked)
        out.write(results, rejects)
        report.results += len(results)
        report.rejects += len(rejects)
        report.shards += 1
        if progress is not None:
            progress(len(batch))
    return report
