"""The teacher stage: what the three VARD stages (:mod:`pipeline.synthesis.stages`) share.

Each stage has its own teacher, template and sampling (the paper uses three different models).
``run(batch)`` renders one prompt per record, serves what the request cache already holds, sends
the rest to the teacher, commits every success to the cache the moment it arrives (so a killed
run re-sends only the requests that were in flight), then validates each output and returns the
updated record or a :class:`Reject` whose message names the record and the field.

``rollouts`` is the number of attempts per record: attempt ``r + 1`` (same prompt, seed + 1) is
sent only for records whose attempt ``r`` produced unusable content (bad format, empty,
truncated, a changed answer). Transport failures are not re-rolled: the teacher already retried.

Each stage instance owns one private event-loop thread, so ``run`` works the same from plain
code, from a thread pool and from inside a running event loop, and HTTP connections survive
across batches. Close it with :meth:`TeacherStage.close` or a ``with`` block.

A teacher in ``mode: batch`` sends the misses through a
:class:`~pipeline.synthesis.batch.runner.BatchRunner` instead (a provider's Batch API, or vLLM's
offline engine), into the same cache; :meth:`TeacherStage.prefetch` submits a whole shard's
first-attempt requests at once before the shard runs, so the batches are as large as the shard.
Answers a batch brought in this process count as sent (``cached: false``), not as cache hits.
(Over 400 lines: the online and batch paths share the per-record logic, which stays in one class.)
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from pipeline.ids import stable_hash
from pipeline.records import Reject, utcnow
from pipeline.store import shard_of
from pipeline.synthesis.batch.state import BatchScope
from pipeline.synthesis.cache import RequestCache, request_key, response_to_cache
from pipeline.synthesis.loop import LoopThread
from pipeline.synthesis.prompts import PromptError, load_template
from pipeline.synthesis.teachers import build_teacher
from pipeline.synthesis.teachers.base import (
    Teacher,
    TeacherConfig,
    TeacherError,
    TeacherRequest,
    TeacherResponse,
)
from pipeline.synthesis.usage import UsageTotals, cost_usd

if TYPE_CHECKING:
    from pipeline.synthesis.batch.runner import BatchRunner

STAGE_SAMPLING_DEFAULTS: dict[str, dict[str, Any]] = {
    "describe": {"temperature": 0.2, "top_p": 0.95, "max_tokens": 2048, "seed": 0},
    "reason": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 8192, "seed": 0},
    "anchor": {"temperature": 0.3, "top_p": 0.95, "max_tokens": 8192, "seed": 0},
}
_REASON_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # schemas/reject.schema.json
# Reject reasons about the content of one output: another rollout may do better.
REROLL_REASONS = frozenset({"describe_empty", "format_invalid", "anchor_answer_changed",
                            "teacher_truncated", "teacher_malformed", "teacher_refused"})


@dataclass
class StageConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={
        "help": "Teacher of this stage (backend, model, endpoint, concurrency, retries, prices)."})
    template: str = field(default="", metadata={
        "help": "Prompt template name in templates_dir (file <name>.j2); empty = the stage name."})
    templates_dir: str | None = field(default=None, metadata={
        "help": "Folder of prompt templates; null = the project's prompts/ folder."})
    sampling: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Sampling parameters merged over the stage's defaults (temperature, top_p, "
                "max_tokens, seed; backend extras such as top_k pass through). Part of the cache key."})
    rollouts: int = field(default=1, metadata={
        "help": "Attempts per record: attempt r+1 (seed+1) is sent only when attempt r's output "
                "was unusable (format, empty, truncated, changed answer)."})

    def __post_init__(self):
        if self.rollouts < 1:
            raise ValueError(f"rollouts must be >= 1, got {self.rollouts}")


def _response_from_cache(data: dict) -> TeacherResponse:
    return TeacherResponse(text=data["text"], reasoning=data.get("reasoning"),
                           prompt_tokens=int(data.get("prompt_tokens", 0)),
                           completion_tokens=int(data.get("completion_tokens", 0)),
                           finish_reason=data.get("finish_reason", "stop"), model=data.get("model", ""))


@dataclass
class Finished:
    """A validated teacher output: the stage text, fields for the record and for the stage entry."""

    text: str
    record_fields: dict = field(default_factory=dict)
    stage_fields: dict = field(default_factory=dict)


@dataclass
class _Pending:
    index: int
    record: dict
    messages: list[dict]
    last_reject: Reject | None = None


class TeacherStage:
    """Base of the teacher stages; subclasses define ``name``, ``_context`` and ``_finish``.

    The class attributes are the stage's declaration in :mod:`pipeline.plan`: the fields it
    ``requires`` of its input records and the ones it ``produces`` (checked by the executor),
    and what its teacher reads by default (``default_modality``: "vision" sends the images,
    "text" leaves them out; ``teacher.modality`` overrides it).
    """

    name = "teacher"
    schema = "sample"
    scope = "shard"
    requires: tuple[str, ...] = ("question", "images", "answer_type")
    produces: tuple[str, ...] = ()
    default_modality = "vision"

    @classmethod
    def from_config(cls, config) -> TeacherStage:
        """The stage as the synthesis config asks (``config.stages.<name>``, the run's request
        cache); the three teacher stages share one SQLite cache, keyed by stage."""
        scope = BatchScope(run=Path(config.run.store_dir).name, config=config.digest()[:16])
        return cls(getattr(config.stages, cls.name), cache=config.run.request_cache_path(), progress=False,
                   batch_scope=scope, batch_wait=config.run.batch_wait, n_shards=config.run.n_shards)

    def __init__(self, config: StageConfig | None = None, cache: RequestCache | str | Path | None = None,
                 teacher: Teacher | None = None, progress: bool | None = None,
                 batch_scope: BatchScope | None = None, batch_wait: bool = True, n_shards: int = 1):
        self.config = config or StageConfig()
        self.template = load_template(self.config.template or self.name, self.config.templates_dir)
        self.teacher = teacher or build_teacher(self.config.teacher)
        self.teacher_config = self.teacher.config  # an injected teacher brings its own config
        self.modality = self.teacher_config.modality or self.default_modality
        self.cache = RequestCache(cache) if isinstance(cache, (str, Path)) else cache
        self.sampling = {**STAGE_SAMPLING_DEFAULTS.get(self.name, {}), **self.config.sampling}
        self.progress = progress
        self._loop: LoopThread | None = None
        self.usage = UsageTotals()  # requests actually sent
        self.cache_hits = 0
        self._counters = threading.Lock()  # run() may be called from several worker threads
        self.batch_scope, self.batch_wait, self.n_shards = batch_scope or BatchScope(), batch_wait, n_shards
        self._batch: BatchRunner | None = None
        if self.batch_mode and self.cache is None:
            raise ValueError(f"stage {self.name}: teacher mode batch needs a request cache (its batch "
                             "state lives in the cache's SQLite file)")

    @property
    def batch_mode(self) -> bool:
        return self.teacher_config.mode == "batch"

    # -- public -------------------------------------------------------------------------------

    def run(self, batch: list[dict]) -> list[dict | Reject]:
        outputs: list[dict | Reject | None] = [None] * len(batch)
        pending: list[_Pending] = []
        for i, record in enumerate(batch):
            if not isinstance(record, dict):
                raise TypeError(f"stage {self.name}: batch item {i} is a {type(record).__name__}, "
                                "not a record dict (rejects must not be fed to the next stage)")
            prepared = self._prepare(record)
            if isinstance(prepared, Reject):
                outputs[i] = prepared
            else:
                pending.append(_Pending(i, record, prepared))
        for rollout in range(self.config.rollouts):
            if not pending:
                break
            sampling = self._sampling(rollout)
            requests = [self._request(p, sampling, rollout) for p in pending]
            results = self._fetch(requests)
            retry: list[_Pending] = []
            for p, req, (result, cached) in zip(pending, requests, results, strict=True):
                outcome = self._outcome(p.record, result, cached, sampling, rollout)
                if isinstance(outcome, Reject) and outcome.reason in REROLL_REASONS \
                        and rollout + 1 < self.config.rollouts:
                    p.last_reject = outcome
                    retry.append(p)
                else:
                    outputs[p.index] = outcome
            pending = retry
        for p in pending:  # only reached when rollouts ran out
            outputs[p.index] = p.last_reject
        return outputs  # type: ignore[return-value]

    def usage_summary(self) -> dict:
        """Requests sent, cache hits, tokens and estimated cost of this stage instance so far
        (the run report shows the difference over each task)."""
        with self._counters:
            return {"stage": self.name, "teacher": self.teacher_config.public(),
                    "prompt": self.template.provenance(), **self.usage.as_dict(),
                    "cache_hits": self.cache_hits,
                    "cost_usd": round(cost_usd(self.teacher_config, self.usage.prompt_tokens,
                                               self.usage.completion_tokens), 6)}

    def preflight(self) -> None:
        """Check the teacher's endpoint before any work (the model is served, max_tokens fits);
        raises :class:`~pipeline.synthesis.teachers.base.TeacherSetupError` naming the key. A
        teacher on vLLM's offline batch engine has no endpoint: its interpreter is checked."""
        if self.batch_mode and self.teacher_config.serve is not None:
            from pipeline.synthesis.batch.offline import preflight_offline
            preflight_offline(self.teacher_config, key_prefix=f"stages.{self.name}.teacher")
            return
        self.teacher.preflight(self._sampling(0), key_prefix=f"stages.{self.name}.teacher")

    def prefetch(self, records: Callable[[], Iterable[dict]], shard: int | None = None) -> dict:
        """Mode batch: put every record's request into batches at once, one rollout at a time, and
        wait for them (or, with ``batch_wait`` off, submit and raise
        :class:`~pipeline.synthesis.batch.runner.BatchesPending`); then :meth:`run` over the same
        records finds every answer in the cache. ``records()`` yields the records not done yet
        (called once per rollout: nothing is held in memory but ids). Rollout r+1 is sent for
        the records whose rollout r was unusable, as :meth:`run` would. Returns the usage."""
        usage, lock = UsageTotals(), threading.Lock()
        failed: dict[str, TeacherError] = {}

        def on_result(key: str, result, collected: bool) -> None:
            with lock:
                if collected:
                    usage.add(result)
                if isinstance(result, TeacherError):
                    failed[key] = result

        need: set[str] | None = None  # ids that still need an attempt (None: every record)
        for rollout in range(self.config.rollouts):
            sampling = self._sampling(rollout)
            requests = (r for _, r in self._pending_requests(records, need, sampling, rollout))
            self._batch_runner().collect(self._cache_misses(requests), on_result, shard)
            if rollout + 1 == self.config.rollouts:
                break
            need = self._unusable(self._pending_requests(records, need, sampling, rollout), failed,
                                  sampling, rollout)
            if not need:
                break
        return {**usage.as_dict(), "cache_hits": 0,
                "cost_usd": round(cost_usd(self.teacher_config, usage.prompt_tokens, usage.completion_tokens), 6)}

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        if self._loop is not None:
            try:
                self._loop.run(self.teacher.aclose())
            finally:
                self._loop.stop()
                self._loop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- per record ---------------------------------------------------------------------------

    def _reject(self, record: dict, reason: str, message: str, field: str | None = None) -> Reject:
        rid = record.get("id") or "unknown"
        where = f" field {field}:" if field else ""
        return Reject(id=rid, stage=self.name, reason=reason, field=field, source=record.get("source"),
                      message=f"record {rid}: stage {self.name}:{where} {message}")

    def _prepare(self, record: dict) -> list[dict] | Reject:
        # Inputs come from the store, validated when they were written: only what the prompt
        # needs is checked here (the executor validates every output against the contract).
        for name in self.requires:
            if "." not in name and name not in record:  # earlier stages' texts: see _earlier
                return self._reject(record, "missing_input", "required by this stage", f"$.{name}")
        context = self._context(record)
        if isinstance(context, Reject):
            return context
        base = {"question": record["question"], "choices": record.get("choices") or None,
                "answer_type": record["answer_type"], "n_images": len(record.get("images") or []),
                "with_images": self.modality == "vision"}
        try:
            return self.template.render(**base, **context)
        except PromptError as err:
            return self._reject(record, "prompt_render_failed", str(err))

    def _context(self, record: dict) -> dict | Reject:
        return {}

    def _earlier(self, record: dict, stage: str) -> str | Reject:
        text = ((record.get("stages") or {}).get(stage) or {}).get("text")
        if not isinstance(text, str) or not text.strip():
            return self._reject(record, "missing_input", f"run the {stage} stage first",
                                f"$.stages.{stage}.text")
        return text

    def _sampling(self, rollout: int) -> dict:
        sampling = dict(self.sampling)
        if rollout and sampling.get("seed") is not None:
            sampling["seed"] = int(sampling["seed"]) + rollout
        return sampling

    def _request(self, p: _Pending, sampling: dict, rollout: int) -> TeacherRequest:
        # The key covers the exact prompt (question, earlier outputs), not only the sample id:
        # a re-run describe stage must not be answered with a reason cached for the old text.
        prompt_digest = stable_hash({"messages": p.messages, "max_pixels": self.teacher_config.max_pixels})
        key = request_key(self.teacher.backend, self.teacher.model, self.name, self.template.sha256,
                          sampling, f"{p.record['id']}:{prompt_digest[:32]}", rollout)
        return TeacherRequest(key=key, stage=self.name, messages=p.messages,
                              images=[im["bytes"] for im in p.record["images"]] if self.modality == "vision" else [],
                              sampling=sampling, record=p.record)

    def _outcome(self, record: dict, result: TeacherResponse | TeacherError, cached: bool,
                 sampling: dict, rollout: int) -> dict | Reject:
        field_path = f"$.stages.{self.name}.text"
        if isinstance(result, TeacherError):
            reason = result.reason if _REASON_RE.match(str(result.reason)) else "teacher_failed"
            detail = "" if reason == result.reason else f" [backend reason {result.reason!r}]"
            return self._reject(record, reason, f"teacher {self.teacher.model}: {result.message}{detail}",
                                field_path)
        finished = self._finish(record, result)
        if isinstance(finished, Reject):
            return finished
        out = dict(record)
        stages = dict(record.get("stages") or {})
        stages[self.name] = {
            "text": finished.text, "teacher": self.teacher_config.public(), "prompt": self.template.provenance(),
            "modality": self.modality, "sampling": sampling, "rollout": rollout,
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": int(result.prompt_tokens), "completion_tokens": int(result.completion_tokens)},
            "cached": cached, "finished_at": utcnow(), **finished.stage_fields}
        out["stages"] = stages
        out.update(finished.record_fields)
        out["programmatic"] = any((s.get("teacher") or {}).get("backend") == "programmatic"
                                  for s in stages.values())
        out.setdefault("created_at", utcnow())
        out["updated_at"] = utcnow()
        return out

    def _finish(self, record: dict, result: TeacherResponse) -> Finished | Reject:
        raise NotImplementedError

    # -- transport ----------------------------------------------------------------------------

    def _fetch(self, requests: list[TeacherRequest]) -> list[tuple[TeacherResponse | TeacherError, bool]]:
        """One ``(result, served_from_cache)`` per request, in order."""
        hits = self.cache.get_many([r.key for r in requests]) if self.cache is not None else {}
        sent = self._batch.take_fresh(hits) if self._batch is not None else set()  # batched here
        with self._counters:
            self.cache_hits += sum(1 for r in requests if r.key in hits and r.key not in sent)
        misses = [r for r in requests if r.key not in hits]
        fresh: dict[str, TeacherResponse | TeacherError] = {}
        if misses and self.batch_mode:
            fresh = self._send_batch(misses)
        elif misses:
            with self._counters:
                if self._loop is None:
                    self._loop = LoopThread(f"avar-{self.name}-loop")
            fresh = self._loop.run(self._send(misses))
        return [(_response_from_cache(hits[r.key]), r.key not in sent) if r.key in hits else (fresh[r.key], False)
                for r in requests]

    # -- batch mode ---------------------------------------------------------------------------

    def _batch_runner(self) -> BatchRunner:
        from pipeline.synthesis.batch.runner import BatchRunner  # the openai client: only when used

        with self._counters:
            if self._batch is None:
                self._batch = BatchRunner(self.teacher, self.cache, self.name,
                                          self.cache.path.parent / "batches" / self.name,
                                          scope=self.batch_scope, wait=self.batch_wait)
            return self._batch

    def _send_batch(self, requests: list[TeacherRequest]) -> dict[str, TeacherResponse | TeacherError]:
        wanted = {r.key for r in requests}
        results: dict[str, TeacherResponse | TeacherError] = {}

        def on_result(key: str, result, collected: bool) -> None:
            with self._counters:
                if collected:
                    self.usage.add(result)
                if key in wanted:
                    results[key] = result

        runner = self._batch_runner()
        runner.collect(requests, on_result, shard_of(requests[0].record["id"], self.n_shards))
        runner.take_fresh(results)  # reported here as sent, not later as cache hits
        missing = wanted - set(results)
        if missing:
            raise RuntimeError(f"teacher {self.teacher.model}: the batches returned no result for "
                               f"{len(missing)} request(s) of stage {self.name}")
        return results

    def _pending_requests(self, records: Callable[[], Iterable[dict]], need: set[str] | None,
                          sampling: dict, rollout: int) -> Iterator[tuple[str, TeacherRequest]]:
        """``(record id, request)`` of attempt ``rollout`` for the records in ``need``. The
        requests keep their record (images included) only while the caller holds them."""
        for record in records():
            if need is not None and record.get("id") not in need:
                continue
            prepared = self._prepare(record)
            if not isinstance(prepared, Reject):  # run() rejects it again, with its reason
                yield record["id"], self._request(_Pending(0, record, prepared), sampling, rollout)

    def _unusable(self, pending: Iterable[tuple[str, TeacherRequest]], failed: dict[str, TeacherError],
                  sampling: dict, rollout: int, chunk: int = 256) -> set[str]:
        """Ids whose attempt ``rollout`` came back unusable (a reason another rollout may fix)."""
        out: set[str] = set()
        batch: list[tuple[str, TeacherRequest]] = []
        for item in itertools.chain(pending, [None]):  # None flushes the last chunk
            if item is not None:
                batch.append(item)
                if len(batch) < chunk:
                    continue
            hits = self.cache.get_many([r.key for _, r in batch])
            for rid, request in batch:
                result = _response_from_cache(hits[request.key]) if request.key in hits else failed.get(request.key)
                if result is None:
                    continue
                outcome = self._outcome(request.record, result, True, sampling, rollout)
                if isinstance(outcome, Reject) and outcome.reason in REROLL_REASONS:
                    out.add(rid)
            batch = []
        return out

    def _cache_misses(self, requests: Iterable[TeacherRequest], chunk: int = 256) -> Iterator[TeacherRequest]:
        batch: list[TeacherRequest] = []
        for request in requests:
            batch.append(request)
            if len(batch) >= chunk:
                yield from self._drop_hits(batch)
                batch = []
        yield from self._drop_hits(batch)

    def _drop_hits(self, requests: list[TeacherRequest]) -> list[TeacherRequest]:
        hits = self.cache.get_many([r.key for r in requests]) if requests else {}
        return [r for r in requests if r.key not in hits]

    async def _send(self, requests: list[TeacherRequest]) -> dict[str, TeacherResponse | TeacherError]:
        results: dict[str, TeacherResponse | TeacherError] = {}
        bar = tqdm(total=len(requests), desc=f"{self.name} requests", unit="req", leave=False,
                   disable=(not self.progress) if self.progress is not None else None)

        def on_result(i: int, result: TeacherResponse | TeacherError) -> None:
            request = requests[i]
            if isinstance(result, TeacherResponse) and self.cache is not None:
                self.cache.put(request.key, response_to_cache(result), self.name)
            with self._counters:
                self.usage.add(result)
            results[request.key] = result
            bar.update(1)

        try:
            await self.teacher.agenerate(requests, on_result=on_result)
        finally:
            bar.close()
        missing = [r.key for r in requests if r.key not in results]
        if missing:
            raise RuntimeError(f"teacher {self.teacher.model} returned no result for {len(missing)} "
                               f"request(s) of stage {self.name}")
        return results
