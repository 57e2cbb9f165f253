"""List and cancel a run's batches (``python -m flows.synth --batches`` / ``--cancel-batches``).

Both read the run's batch state (:mod:`~pipeline.synthesis.batch.state`) and ask each batch's
provider for its current status. Cancelling writes ``cancel_requested`` first (so a running flow
that polls the batch stops its stage instead of resubmitting), then asks the provider to cancel;
the provider keeps the lines that finished, and the next run collects them and submits only the
rest.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.synthesis.batch.runner import make_api
from pipeline.synthesis.batch.state import PENDING_REMOTE, BatchState, Job
from pipeline.synthesis.teachers.base import TeacherConfig


def _apis(teachers: dict[str, TeacherConfig], work_root: Path) -> dict[str, object]:
    from pipeline.synthesis.teachers.openai_backend import OpenAITeacher
    return {stage: make_api(OpenAITeacher(config), work_root / stage)
            for stage, config in teachers.items() if config.mode == "batch"}


def _refresh(state: BatchState, job: Job, api) -> None:
    if api is None or not job.batch_id or job.status not in PENDING_REMOTE:
        return
    batch = api.retrieve(job.batch_id)
    state.update(job, status=batch.status, remote_status=batch.status, total=batch.total,
                 completed=batch.completed, failed=batch.failed,
                 output_file_id=batch.output_file_id, error_file_id=batch.error_file_id)


def row(job: Job) -> dict:
    """One job as a person reads it."""
    return {"stage": job.stage, "shard": "" if job.shard is None else job.shard, "job": job.uid,
            "batch": job.batch_id or "-", "file": job.file_id or "-", "status": job.progress(),
            "requests": job.n_requests, "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created))}


def list_batches(cache_path: str | Path, teachers: dict[str, TeacherConfig], refresh: bool = True) -> list[dict]:
    """Every batch job of the run, oldest first; open ones with their provider's current status."""
    cache_path = Path(cache_path)
    if not cache_path.exists():
        return []
    state = BatchState(cache_path)
    apis = _apis(teachers, cache_path.parent / "batches") if refresh else {}
    try:
        jobs = state.jobs()
        for job in jobs:
            _refresh(state, job, apis.get(job.stage))
        return [row(job) for job in jobs]
    finally:
        state.close()


def cancel_batches(cache_path: str | Path, teachers: dict[str, TeacherConfig],
                   stages: list[str] | None = None) -> list[dict]:
    """Cancel every open job of the run (of ``stages``); returns the jobs it touched."""
    cache_path = Path(cache_path)
    if not cache_path.exists():
        return []
    state = BatchState(cache_path)
    apis = _apis(teachers, cache_path.parent / "batches")
    touched = []
    try:
        for job in state.jobs(open_only=True):
            if stages and job.stage not in stages:
                continue
            state.update(job, cancel_requested=1)  # before the call: a polling flow stops its stage
            api = apis.get(job.stage)
            if api is not None and job.batch_id and job.status in PENDING_REMOTE and job.status != "cancelling":
                batch = api.cancel(job.batch_id)
                state.update(job, status=batch.status, remote_status=batch.status, total=batch.total,
                             completed=batch.completed, failed=batch.failed)
            touched.append(row(job))
        return touched
    finally:
        state.close()
