"""The batch loop of one teacher stage: requests in, results in the request cache out.

:meth:`BatchRunner.collect` takes the requests the cache does not hold, writes them as JSONL
files (:mod:`~pipeline.synthesis.batch.lines`), and drives each file's job through the
provider (:mod:`~pipeline.synthesis.batch.api` or :mod:`~pipeline.synthesis.batch.offline`)
until every request has an answer or a final error:

1. upload the file, create the batch (with metadata ``avar_run``, ``avar_stage``,
   ``avar_shard``, ``avar_config``, ``avar_model``, ``avar_job``), poll it with back-off
   (``finalizing`` is still pending);
2. when it ends (``completed``, ``expired``, ``cancelled``), download its output *and* error
   files, match lines by ``custom_id``, put every answer in the request cache, and put the lines
   that failed or never ran in a new job, up to ``batch.max_attempts`` tries; after that they are
   final errors naming the batches they went through (the stage makes them rejects). The new
   jobs and the old one's ``collected`` mark are one transaction: a line is always in exactly
   one open job, or answered, or final;
3. a batch that ``failed`` with ``token_limit_exceeded`` is submitted again once this run's
   other batches of the model have drained (or after ``poll_max_s``), not in a loop; a refusal
   that repeats trips the teacher's circuit breaker.

Every step is written to :mod:`~pipeline.synthesis.batch.state` before and after its API call,
so a process killed anywhere resumes without a second upload, batch or payment: a request in an
open job is never put in another, a file or batch whose creation was not recorded is looked up
(by unique file name, by ``avar_job``), and when the state holds no job of the stage at all the
account's newest batches are listed to find this stage's by metadata.

With ``wait=False`` (``--no-wait``) :meth:`collect` submits, checks each batch once, collects
what ended, and raises :class:`BatchesPending` while batches still run.

One file of ~550 lines on purpose: it is one state machine, and every transition (with the state
write around its API call) reads in one place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pipeline.errors import PermanentError
from pipeline.images import ImageError
from pipeline.synthesis.batch.api import ApiRefused, OpenAIBatchAPI, RemoteBatch
from pipeline.synthesis.batch.lines import (
    FileSpec,
    FileWriter,
    Limits,
    LineResult,
    encode_line,
    estimate_tokens,
    index_lines,
    iter_result_lines,
    line_body,
    parse_line,
    read_line,
)
from pipeline.synthesis.batch.state import (
    PENDING_REMOTE,
    TERMINAL_REMOTE,
    BatchScope,
    BatchState,
    Job,
    LineRef,
)
from pipeline.synthesis.cache import RequestCache, response_to_cache
from pipeline.synthesis.teachers.base import TeacherError, TeacherRequest, TeacherResponse

log = logging.getLogger(__name__)
# on_result(key, result, collected): ``collected`` is False for a request that had already
# failed for good in this process (delivered again, not paid again)
OnBatchResult = Callable[[str, "TeacherResponse | TeacherError", bool], None]
_CHUNK = 500


class BatchesPending(Exception):
    """``--no-wait``: batches were submitted (or are still running); re-run to collect them."""

    def __init__(self, stage: str, jobs: list[Job]):
        self.stage, self.jobs = stage, jobs
        states = Counter(job.progress() for job in jobs)
        super().__init__(f"stage {stage}: {len(jobs)} batch(es) still running ("
                         + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
                         + "); re-run the same command to collect them")


class BatchCancelled(RuntimeError, PermanentError):
    """Batches were cancelled on request (``--cancel-batches``): their finished lines are kept;
    a re-run submits the rest again."""


def make_api(teacher, work_dir: Path):
    """The provider of ``teacher``: vLLM's offline engine when it has ``serve``, else the
    OpenAI Batch API at its ``base_url``."""
    if teacher.config.serve is not None:
        from pipeline.synthesis.batch.offline import OfflineBatchAPI
        return OfflineBatchAPI(teacher.config, work_dir)
    return OpenAIBatchAPI(teacher)


class BatchRunner:
    """See the module docstring. One per stage instance; safe to call from several threads
    (each job is driven by one thread at a time)."""

    def __init__(self, teacher, cache: RequestCache, stage: str, work_dir: Path,
                 scope: BatchScope | None = None, wait: bool = True, api=None,
                 sleep: Callable[[float], None] = time.sleep):
        self.teacher, self.cache, self.stage = teacher, cache, stage
        self.config = teacher.config.batch
        self.work_dir = Path(work_dir)
        self.scope = scope or BatchScope()
        self.wait = wait
        self.api = api or make_api(teacher, self.work_dir)
        self.state = BatchState(cache.path)
        self.limits = Limits(self.config.max_requests_per_file, self.config.max_file_bytes,
                             self.config.max_enqueued_tokens)
        cap = getattr(self.api, "max_poll_s", None) or self.config.poll_max_s
        self.poll_max_s = min(self.config.poll_max_s, cap)  # a local engine is looked at often
        self.poll_initial_s = min(self.config.poll_initial_s, self.poll_max_s)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._job_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._attempts: Counter[str] = Counter()
        self._batches_of: dict[str, list[str]] = defaultdict(list)
        self._final: dict[str, TeacherError] = {}
        self._fresh: set[str] = set()
        self._due: dict[str, float] = {}
        self._interval: dict[str, float] = {}
        self._recovered = False
        self._watched: set[str] = set()  # jobs this process saw open and not cancelled

    # -- public ------------------------------------------------------------------------------

    def collect(self, requests: Iterable[TeacherRequest], on_result: OnBatchResult,
                shard: int | None = None) -> None:
        """Get every request of ``requests`` answered (into the cache) or failed for good;
        ``on_result(key, result, collected)`` hears of each line collected (also lines of older
        jobs that this call finishes) and of each request that had already failed for good. Raises :class:`BatchesPending` with ``wait=False``."""
        self._recover_once()
        wanted: dict[str, None] = {}
        self._build(requests, wanted, shard, on_result)
        self._drive(wanted, on_result)

    def take_fresh(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` this runner answered in this process (the stage records them as
        sent, not as cache hits); each is reported once."""
        with self._lock:
            found = self._fresh.intersection(keys)
            self._fresh -= found
        return found

    def close(self) -> None:
        close = getattr(self.api, "close", None)
        if close is not None:
            close()
        self.state.close()

    # -- building jobs -----------------------------------------------------------------------

    def _build(self, requests: Iterable[TeacherRequest], wanted: dict[str, None], shard: int | None,
               on_result: OnBatchResult) -> None:
        writer = FileWriter(self.work_dir, self.limits)
        for chunk in _chunks(requests, _CHUNK):
            in_open = self.state.open_jobs_of([r.key for r in chunk])
            for request in chunk:
                if request.key in wanted:
                    continue
                wanted[request.key] = None
                if request.key in in_open or request.key in self._final:
                    continue  # driven with its job, or already final in this process
                try:
                    line = encode_line(request.key, line_body(self.teacher, request))
                except ImageError as e:
                    self._finalize(request.key, TeacherError(e.reason, f"request {request.key}: image: {e.message}"))
                    continue
                spec = writer.add(request.key, line, estimate_tokens(request, self.teacher.config.max_pixels))
                if spec is not None:
                    self._add_job(spec, shard)
        spec = writer.close()
        if spec is not None:
            self._add_job(spec, shard)

    def _add_job(self, spec: FileSpec, shard: int | None) -> Job:
        job = self._job_of(spec, shard)
        self.state.add_job(job, spec.lines)
        log.info("stage %s: batch job %s prepared: %d requests, %.1f MB, ~%d tokens", self.stage,
                 job.uid, job.n_requests, job.n_bytes / 1e6, job.est_tokens)
        return job

    def _job_of(self, spec: FileSpec, shard: int | None) -> Job:
        return Job(uid=spec.uid, stage=self.stage, shard=shard, model=self.teacher.config.model,
                   endpoint=self.api.endpoint, run=self.scope.run, config=self.scope.config,
                   status="prepared", remote_status=None, input_path=str(spec.path),
                   n_requests=len(spec.lines), n_bytes=spec.n_bytes, est_tokens=spec.est_tokens)

    # -- the loop ----------------------------------------------------------------------------

    def _drive(self, wanted: dict[str, None], on_result: OnBatchResult) -> None:
        delivered: set[str] = set()
        while True:
            remaining = [k for k in wanted if k not in delivered]
            for key in remaining:
                if key in self._final:
                    on_result(key, self._final[key], False)
                    delivered.add(key)
            remaining = [k for k in remaining if k not in delivered]
            if not remaining:
                return
            open_of = self.state.open_jobs_of(remaining)
            orphans = [k for k in remaining if k not in open_of]
            if orphans:  # collected by another thread: answered (cached) or final
                hits = self.cache.get_many(orphans)
                for key in orphans:
                    if key in hits:
                        delivered.add(key)
                    elif key not in self._final:
                        raise RuntimeError(f"stage {self.stage}: request {key} is in no open batch job, "
                                           "not answered and not failed (batch state out of step)")
                continue
            jobs = [self.state.job(uid) for uid in sorted(set(open_of.values()))]
            moved = False
            for job in jobs:
                if job is not None:
                    moved |= self._step(job, on_result, delivered)
            if moved:
                continue
            if not self.wait:
                waiting = [j for j in self.state.jobs(self.stage, open_only=True)
                           if j.uid in set(open_of.values())]
                raise BatchesPending(self.stage, waiting)
            now = time.monotonic()
            due = min((self._due.get(j.uid, now) for j in jobs if j is not None), default=now)
            self._sleep(min(max(due - now, 0.0), self.poll_max_s))

    def _step(self, job: Job, on_result: OnBatchResult, delivered: set[str]) -> bool:
        """Do what is due for ``job``; True when something changed (no need to sleep)."""
        with self._job_locks[job.uid]:
            job = self.state.job(job.uid)
            if job is None or job.status == "collected":
                return True
            if self._due.get(job.uid, 0.0) > time.monotonic():
                return False
            if not job.cancel_requested:
                self._watched.add(job.uid)
            elif job.uid in self._watched:  # cancelled while this process waited for it: stop
                self._cancel(job)
            elif job.status in ("prepared", "uploaded"):  # a re-run after a cancel: send it now
                job = self.state.update(job, cancel_requested=0)
            if job.status in ("prepared", "uploading"):
                return self._upload(job)
            if job.status in ("uploaded", "submitting"):
                return self._submit(job)
            if job.status in PENDING_REMOTE:
                return self._poll(job)
            if job.status in TERMINAL_REMOTE or job.status == "downloading":
                self._reconcile(job, on_result, delivered)
                return True
            raise RuntimeError(f"batch job {job.uid}: unknown status {job.status!r}")

    def _cancel(self, job: Job) -> None:
        """A cancel was requested (``--cancel-batches``) for this job."""
        if job.status in ("prepared", "uploaded"):  # nothing runs at the provider yet
            refs = self.state.lines(job.uid)
            self.state.collected_with(job, {r.custom_id: "cancelled" for r in refs}, [],
                                      remote_status="cancelled")
            raise BatchCancelled(f"stage {self.stage}: batch job {job.uid} was cancelled on request "
                                 f"before it was submitted; re-run to submit its {len(refs)} requests")
        if job.status in PENDING_REMOTE and job.status != "cancelling" and job.batch_id:
            self._record(job, self.api.cancel(job.batch_id))

    def _wait(self, job: Job, seconds: float) -> None:
        self._due[job.uid] = time.monotonic() + seconds

    # -- upload and submit -------------------------------------------------------------------

    def _upload(self, job: Job) -> bool:
        path = Path(job.input_path or "")
        file_id = self.api.find_file(job.filename) if job.status == "uploading" else None
        if file_id is None and not path.is_file():
            self._lose(job, f"its input file {path} is gone")
            return True
        if file_id is None:
            self.state.update(job, status="uploading")
            try:
                file_id = self.api.upload(path, job.filename)
            except ApiRefused as refused:
                return self._refused_upload(job, refused)
        self.state.update(job, status="uploaded", file_id=file_id)
        log.info("stage %s: batch job %s uploaded as %s", self.stage, job.uid, file_id)
        return True

    def _refused_upload(self, job: Job, refused: ApiRefused) -> bool:
        if refused.status == 413 and job.n_requests > 1:
            with self._lock:
                self.limits.max_bytes = min(self.limits.max_bytes, max(1, job.n_bytes // 2))
            log.warning("stage %s: the provider refused %d bytes (HTTP 413: %s); files are now cut at "
                        "%d bytes", self.stage, job.n_bytes, refused.message, self.limits.max_bytes)
            self._resplit(job)
            return True
        message = f"batch input file of {job.n_bytes} bytes refused: {refused}"
        self.state.update(job, status="prepared", error=message)
        if refused.status == 413:  # one request alone is over the provider's file limit
            self._fail_lines(job, message)
            return True
        self.teacher.breaker.refused(message)
        self._wait(job, self._backoff(job))
        return True

    def _submit(self, job: Job) -> bool:
        found = self.api.find_batch(job.uid) if job.status == "submitting" else None
        if found is None:
            budget = self.limits.max_tokens
            if budget is not None:
                queued = self.state.enqueued_tokens(job.model, job.endpoint)
                if queued and queued + job.est_tokens > budget:
                    self._wait(job, self.poll_initial_s)
                    return False
            self.state.update(job, status="submitting")
            try:
                found = self.api.create(job.file_id, self._metadata(job), self.config.completion_window)
            except ApiRefused as refused:
                message = f"batch refused: {refused}"
                self.state.update(job, status="uploaded", error=message)
                self.teacher.breaker.refused(message)
                self._wait(job, self._backoff(job))
                return True
        self._record(job, found)
        with self._lock:
            for ref in self.state.lines(job.uid):
                self._batches_of[ref.custom_id].append(found.id)
        log.info("stage %s: batch %s submitted (job %s, %d requests)", self.stage, found.id, job.uid, job.n_requests)
        self._interval[job.uid] = self.poll_initial_s
        self._wait(job, 0.0)
        return True

    def _metadata(self, job: Job) -> dict[str, str]:
        return {"avar_run": self.scope.run[:64], "avar_stage": self.stage,
                "avar_shard": "" if job.shard is None else str(job.shard),
                "avar_config": self.scope.config, "avar_model": job.model[:512], "avar_job": job.uid}

    def _record(self, job: Job, batch: RemoteBatch) -> None:
        self.state.update(job, status=batch.status, remote_status=batch.status, batch_id=batch.id,
                          output_file_id=batch.output_file_id, error_file_id=batch.error_file_id,
                          total=batch.total, completed=batch.completed, failed=batch.failed)

    # -- poll --------------------------------------------------------------------------------

    def _poll(self, job: Job) -> bool:
        before = (job.status, job.completed, job.failed)
        batch = self.api.retrieve(job.batch_id)
        self._record(job, batch)
        if batch.status == "failed":
            return self._failed_batch(job, batch)
        if batch.status in TERMINAL_REMOTE:
            return True
        interval = self._interval.get(job.uid, self.poll_initial_s)
        changed = before != (job.status, job.completed, job.failed)
        interval = self.poll_initial_s if changed else min(interval * 2, self.poll_max_s)
        self._interval[job.uid] = interval
        self._wait(job, interval)
        return False

    def _failed_batch(self, job: Job, batch: RemoteBatch) -> bool:
        text = "; ".join(f"{code}: {message}" if code else message for code, message in batch.errors) \
            or "no reason given"
        if any(code == "token_limit_exceeded" for code, _ in batch.errors):
            others = [j for j in self.state.jobs(open_only=True)
                      if j.uid != job.uid and j.model == job.model and j.status in PENDING_REMOTE]
            self.state.update(job, status="uploaded", batch_id=None, error=f"batch {batch.id}: {text}")
            if others:  # our own batches fill the queue: submit again once one has finished
                log.info("stage %s: batch %s over the enqueued-token limit; waiting for %d running "
                         "batch(es) to drain", self.stage, batch.id, len(others))
                self._wait(job, self.poll_initial_s)
            else:  # someone else's batches, or this file alone: a refusal that may repeat
                self.teacher.breaker.refused(f"batch {batch.id} failed: {text}")
                self._wait(job, self.poll_max_s)
            return False
        self.state.update(job, error=f"batch {batch.id}: {text}")
        self.teacher.breaker.refused(f"batch {batch.id} failed: {text}")
        return True  # collected next: every line is tried again (or is final)

    # -- collect -----------------------------------------------------------------------------

    def _reconcile(self, job: Job, on_result: OnBatchResult, delivered: set[str]) -> None:
        self.state.update(job, status="downloading")
        results: dict[str, LineResult] = {}
        keys = {ref.custom_id for ref in self.state.lines(job.uid)}
        files = []
        for file_id, kind in ((job.output_file_id, "output"), (job.error_file_id, "errors")):
            if file_id:
                files.append(self.api.download(file_id, self.work_dir / f"{job.uid}.{kind}.jsonl"))
        for path in files:
            for raw in iter_result_lines(path):
                key, result = parse_line(self.teacher, raw)
                if key in keys:
                    results[key] = result
        user_cancelled = job.remote_status == "cancelled" and bool(job.cancel_requested) \
            and job.uid in self._watched  # else a re-run after the cancel: resubmit the rest
        refusals = self._settle(job, results, on_result, delivered, user_cancelled)
        if not self.config.keep_files:
            for path in (*files, Path(job.input_path or "")):
                path.unlink(missing_ok=True)
        for refusal in refusals:  # after the commit: the answers above are kept if it trips
            if refusal is None:
                self.teacher.breaker.success()
            else:
                self.teacher.breaker.refused(refusal)
        if user_cancelled:
            raise BatchCancelled(f"stage {self.stage}: batch {job.batch_id} was cancelled on request; "
                                 f"its {sum(1 for r in results.values() if r.kind == 'ok')} finished "
                                 "requests are cached; re-run to submit the rest again")

    def _settle(self, job: Job, results: dict[str, LineResult], on_result: OnBatchResult,
                delivered: set[str], user_cancelled: bool) -> list[str | None]:
        """Cache the answers; resubmit or finalize the rest (one transaction for the state).
        Returns each line's refusal (None for an answer), in file order, for the breaker."""
        outcomes: dict[str, str] = {}
        retry: list[LineRef] = []
        refusals: list[str | None] = []
        finals: dict[str, TeacherError] = {}
        why = {"expired": "the batch expired", "cancelled": "the batch was cancelled",
               "failed": f"the batch failed: {job.error}"}.get(job.remote_status or "", "")
        for ref in self.state.lines(job.uid):
            key = ref.custom_id
            result = results.get(key) or LineResult("retry", TeacherError(
                "teacher_failed", "batch line missing from the output and error files"
                + (f" ({why})" if why else ""), True))
            refusals.append(result.refusal)
            if result.kind == "ok":
                self.cache.put(key, response_to_cache(result.result), self.stage)
                outcomes[key] = "ok"
                continue
            with self._lock:
                self._attempts[key] += 1
                attempts = self._attempts[key]
            if result.kind == "retry" and attempts < self.config.max_attempts and not user_cancelled:
                outcomes[key] = "retry"
                retry.append(ref)
                continue
            outcomes[key] = "final"
            finals[key] = self._final_error(key, result.result, attempts, result.kind == "retry")
        new_jobs = self._resubmission(job, retry) if retry else []
        self.state.collected_with(job, outcomes, new_jobs, remote_status=job.remote_status)
        for key, outcome in outcomes.items():
            if outcome == "ok":
                with self._lock:
                    self._fresh.add(key)
                on_result(key, results[key].result, True)
                delivered.add(key)
            elif outcome == "final" and not user_cancelled:
                self._finalize(key, finals[key])
                on_result(key, finals[key], True)
                delivered.add(key)
        log.info("stage %s: batch %s collected: %d answered, %d to resubmit, %d failed for good",
                 self.stage, job.batch_id, sum(o == "ok" for o in outcomes.values()), len(retry),
                 len(finals))
        return refusals

    def _final_error(self, key: str, error: TeacherError, attempts: int, exhausted: bool) -> TeacherError:
        if not exhausted:
            return error
        with self._lock:
            batches = ", ".join(self._batches_of.get(key, [])) or "unknown"
        return TeacherError(error.reason, f"{error.message}; {attempts} attempt(s) in batch(es) {batches}")

    def _finalize(self, key: str, error: TeacherError) -> None:
        with self._lock:
            self._final[key] = error

    def _resubmission(self, job: Job, refs: list[LineRef]) -> list[tuple[Job, list[LineRef]]]:
        """New jobs holding the lines ``refs`` of ``job`` (copied from its input file)."""
        path = Path(job.input_path or "")
        if not path.is_file():
            raise RuntimeError(f"batch job {job.uid}: input file {path} is gone; cannot resubmit "
                               f"{len(refs)} line(s)")
        writer, specs = FileWriter(self.work_dir, self.limits), []
        for ref in refs:
            line = read_line(path, ref)
            spec = writer.add(ref.custom_id, line, _line_tokens(job, ref))
            if spec is not None:
                specs.append(spec)
        spec = writer.close()
        if spec is not None:
            specs.append(spec)
        return [(self._job_of(s, job.shard), s.lines) for s in specs]

    def _resplit(self, job: Job) -> None:
        """After a 413: the job's lines in files under the lowered byte limit, in its place."""
        refs = self.state.lines(job.uid)
        new_jobs = self._resubmission(job, refs)
        self.state.collected_with(job, {r.custom_id: "split" for r in refs}, new_jobs,
                                  remote_status="split")
        Path(job.input_path or "").unlink(missing_ok=True)

    def _fail_lines(self, job: Job, message: str) -> None:
        refs = self.state.lines(job.uid)
        self.state.collected_with(job, {r.custom_id: "final" for r in refs}, [], remote_status="refused")
        for ref in refs:
            self._finalize(ref.custom_id, TeacherError("teacher_failed", message))

    def _lose(self, job: Job, why: str) -> None:
        log.warning("stage %s: batch job %s cannot be sent: %s; a re-run rebuilds it", self.stage, job.uid, why)
        self._fail_lines(job, f"batch job {job.uid}: {why}")

    def _backoff(self, job: Job) -> float:
        interval = min(self._interval.get(job.uid, self.poll_initial_s / 2) * 2, self.poll_max_s)
        self._interval[job.uid] = interval
        return interval

    # -- lost state --------------------------------------------------------------------------

    def _recover_once(self) -> None:
        with self._lock:
            if self._recovered:
                return
            self._recovered = True
        if not self.config.recover_scan or self.state.has_jobs(self.stage, self.api.endpoint):
            return
        known = self.state.known_batch_ids()
        for batch in self.api.list_batches(self.config.recover_scan):
            meta = batch.metadata
            if (meta.get("avar_stage") != self.stage or meta.get("avar_model") != self.teacher.config.model
                    or meta.get("avar_config", "") != self.scope.config or batch.id in known
                    or batch.status == "failed"):
                continue
            self._adopt(batch)

    def _adopt(self, batch: RemoteBatch) -> None:
        uid = batch.metadata.get("avar_job") or batch.id
        path = self.api.download(batch.input_file_id, self.work_dir / f"{uid}.input.jsonl")
        lines = index_lines(path)
        shard = batch.metadata.get("avar_shard")
        job = Job(uid=uid, stage=self.stage, shard=int(shard) if shard else None,
                  model=self.teacher.config.model, endpoint=self.api.endpoint, run=self.scope.run,
                  config=self.scope.config, status=batch.status, remote_status=batch.status,
                  input_path=str(path), n_requests=len(lines), n_bytes=path.stat().st_size,
                  est_tokens=0, file_id=batch.input_file_id, batch_id=batch.id,
                  output_file_id=batch.output_file_id, error_file_id=batch.error_file_id,
                  total=batch.total, completed=batch.completed, failed=batch.failed)
        self.state.add_job(job, lines)
        log.warning("stage %s: found batch %s (%s, %d requests) by its metadata; the run's batch state "
                    "had no job of this stage", self.stage, batch.id, batch.status, len(lines))


def _line_tokens(job: Job, ref: LineRef) -> int:
    """A resubmitted line's share of its job's token estimate (the request is not rebuilt)."""
    return job.est_tokens * ref.length // max(1, job.n_bytes)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
