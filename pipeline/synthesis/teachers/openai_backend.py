"""Teacher over any OpenAI-compatible chat endpoint (vLLM serve, SGLang, OpenAI itself).

The retry policy lives here and only here (the ``openai`` client's own retries are switched off):

* 5xx, connection errors, timeouts and malformed bodies are retried up to ``max_retries`` times
  with exponential back-off and full jitter (delay ~ U(0, min(backoff_max_s, base * 2**n))).
* 429 (and a 5xx carrying ``Retry-After``) is a back-off signal for the whole teacher: the
  delay named by ``Retry-After`` (seconds or an HTTP date, capped at ``backoff_max_s``) pauses
  every request of this teacher, not only the one that was told: rate limits belong to the key.
* ``finish_reason == "length"`` fails at once as ``teacher_truncated`` (a retry would pay for the
  same truncation again); ``"content_filter"`` fails as ``teacher_refused``.
* 401/403/404 mean a wrong key, model or URL: not one sample's failure, so they raise
  :class:`TeacherFatalError` out of ``agenerate`` instead of rejecting every sample.
* A circuit breaker (:class:`~pipeline.synthesis.teachers.base.CircuitBreaker`,
  ``breaker_after``) raises the same when one refusal (another 4xx) repeats, or when attempts
  keep failing to connect (a server that died): one stage failure, not thousands of rejects.
* :meth:`OpenAITeacher.preflight` checks the endpoint before any work: the model is served, and
  ``max_tokens`` fits the ``max_model_len`` the server reports (vLLM does).

The API key is read from the environment variable named by ``config.api_key_env`` and is scrubbed
from every message this module produces; errors are built outside ``except`` blocks so no
exception carries the client's request (whose headers hold the key) as its context.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletion

from pipeline.images import ImageError, to_data_url
from pipeline.synthesis.teachers.base import (
    CircuitBreaker,
    OnResult,
    Teacher,
    TeacherConfig,
    TeacherError,
    TeacherFatalError,
    TeacherRequest,
    TeacherResponse,
    TeacherSetupError,
    replace_image_parts,
)
from pipeline.synthesis.usage import UsageTotals

log = logging.getLogger(__name__)

# Sampling keys the chat-completions endpoint takes as named arguments; any other key (top_k,
# min_p, repetition_penalty, chat_template_kwargs, ...) goes in ``extra_body``, which vLLM and
# SGLang read and OpenAI ignores.
CHAT_PARAMS = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "response_format", "reasoning_effort", "n",
})
FATAL_STATUS = {401: "authentication failed (check the key in ${env})",
                403: "permission denied (check the key in ${env})",
                404: "not found (check base_url and model)"}
_ERROR_TEXT_CHARS = 300


def reasoning_of(message: Any) -> str | None:
    """A reasoning model's chain, where servers put it: ``reasoning_content`` (DeepSeek's API,
    vLLM before 0.11) or ``reasoning`` (vLLM's reasoning parsers since); None when absent."""
    extra = getattr(message, "model_extra", None) or {}
    for name in ("reasoning_content", "reasoning"):
        value = getattr(message, name, None) or extra.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full-jitter exponential back-off: uniform in [0, min(max_s, base_s * 2**attempt)]."""
    return rng.uniform(0.0, min(max_s, base_s * (2.0 ** attempt)))


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After-Ms``/``Retry-After`` (seconds or HTTP date), or None."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when is None:
                return None
            seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    return None


@dataclass
class _Failed:
    """One failed attempt: the error it would end in, and a server-requested delay if any."""

    error: TeacherError
    retry_after_s: float | None = None


class _LoopState:
    """Client and semaphore bound to one event loop (httpx connections cannot cross loops)."""

    def __init__(self, config: TeacherConfig, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        # max_retries=0: the client's built-in retries would multiply with ours, ignore our
        # back-off/jitter settings and be invisible in our counters; one policy, in one place.
        self.client = openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key(),
                                         max_retries=0, timeout=config.timeout_s)
        self.semaphore = asyncio.Semaphore(config.max_concurrency)
        self.resume_at = 0.0  # loop.time() before which no request starts (429 pause)


class OpenAITeacher(Teacher):
    """Async, bounded-concurrency chat completions with one retry policy (see module doc)."""

    def __init__(self, config: TeacherConfig, rng: random.Random | None = None):
        super().__init__(config)  # TeacherConfig validated its limits when it was built
        self._rng = rng or random.Random()
        self._state: _LoopState | None = None
        self.stats: Counter[str] = Counter()  # requests, successes, retries, failed:<reason>
        self.usage = UsageTotals()
        self.breaker = CircuitBreaker(config.breaker_after, f"teacher {config.model} at {config.base_url}")

    # -- public API ---------------------------------------------------------------------------

    async def agenerate(self, requests: list[TeacherRequest],
                        on_result: OnResult | None = None) -> list[TeacherResponse | TeacherError]:
        """One result per request, in order; ``on_result(i, result)`` fires as each one is final.

        An exception raised by ``on_result`` (or a :class:`TeacherFatalError`) cancels the
        requests still in flight and propagates; results already passed to ``on_result`` stand.
        """
        for request in requests:
            self._check_sampling(request)
        state = self._loop_state()
        results: list[TeacherResponse | TeacherError | None] = [None] * len(requests)
        tasks = [asyncio.create_task(self._indexed(i, r, state)) for i, r in enumerate(requests)]
        try:
            for next_done in asyncio.as_completed(tasks):
                i, result = await next_done
                results[i] = result
                self.usage.add(result)
                if on_result is not None:
                    on_result(i, result)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if requests:
            failed = sum(isinstance(r, TeacherError) for r in results)
            log.info("teacher %s: %d requests, %d failed", self.model, len(requests), failed)
        return results  # type: ignore[return-value]

    def preflight(self, sampling: dict[str, Any], key_prefix: str = "teacher") -> None:
        """Before any work: the endpoint answers ``GET /models``, serves ``model``, and
        ``max_tokens`` fits the ``max_model_len`` it reports (vLLM reports it; OpenAI does not).
        Raises :class:`TeacherSetupError` naming the key to fix."""
        where = f"{self.config.base_url or 'the default OpenAI endpoint'}"
        error: TeacherSetupError | None = None
        served: list[Any] = []
        try:
            with openai.OpenAI(base_url=self.config.base_url, api_key=self.config.api_key(),
                               max_retries=0, timeout=min(self.config.timeout_s, 30.0)) as client:
                served = list(client.models.list())
        except openai.APIConnectionError as e:
            error = TeacherSetupError(f"{key_prefix}.base_url",
                                      f"cannot reach {where} ({type(e).__name__}); is the server up?")
        except openai.APIStatusError as e:
            key = f"{key_prefix}.api_key_env" if e.status_code in (401, 403) else f"{key_prefix}.base_url"
            error = TeacherSetupError(key, self._redact(f"GET {where}/models answered HTTP "
                                                        f"{e.status_code}: {self._body_text(e)}"))
        if error is not None:
            raise error
        ids = [m.id for m in served]
        model = next((m for m in served if m.id == self.config.model), None)
        if model is None:
            raise TeacherSetupError(f"{key_prefix}.model", f"{self.config.model!r} is not served at "
                                    f"{where} (served: {', '.join(ids) or 'none'})")
        limit = getattr(model, "max_model_len", None) or (model.model_extra or {}).get("max_model_len")
        wanted = sampling.get("max_tokens") or sampling.get("max_completion_tokens")
        sampling_prefix = key_prefix.rsplit(".", 1)[0] + ".sampling" if "." in key_prefix else "sampling"
        if isinstance(limit, int) and isinstance(wanted, int) and wanted >= limit:
            raise TeacherSetupError(f"{sampling_prefix}.max_tokens",
                                    f"{wanted} does not fit {self.config.model}'s max_model_len {limit} at "
                                    f"{where} (the prompt needs room too); lower it or serve a longer context")

    def build_messages(self, request: TeacherRequest) -> list[dict]:
        """``request.messages`` with each ``{"type": "image", "index": i}`` part as a data URL."""
        return replace_image_parts(request, lambda image: {
            "type": "image_url", "image_url": {"url": to_data_url(image, self.config.max_pixels)}})

    async def aclose(self) -> None:
        state, self._state = self._state, None
        if state is not None and state.loop is asyncio.get_running_loop():
            await state.client.close()

    # -- internals ----------------------------------------------------------------------------

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            self._state = _LoopState(self.config, loop)
        return self._state

    def _check_sampling(self, request: TeacherRequest) -> None:
        if request.sampling.get("n", 1) != 1:
            raise ValueError(f"request {request.key}: sampling.n must be 1 (one response per "
                             f"request; use rollouts), got {request.sampling['n']!r}")

    def redact(self, text: str) -> str:
        """``text`` without the API key, cut to a readable length (for errors and logs)."""
        return self._redact(text)

    def error_detail(self, error: openai.APIStatusError) -> str:
        """The message of an HTTP error body, redacted."""
        return self._body_text(error)

    def _redact(self, text: str) -> str:
        key = self.config.api_key()
        if key and len(key) >= 4 and key != "EMPTY":
            text = text.replace(key, "***")
        return text[:_ERROR_TEXT_CHARS]

    async def _indexed(self, i: int, request: TeacherRequest, state: _LoopState):
        return i, await self._generate(request, state)

    async def _generate(self, request: TeacherRequest,
                        state: _LoopState) -> TeacherResponse | TeacherError:
        self.stats["requests"] += 1
        messages: list[dict] | None = None
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            async with state.semaphore:
                # checked after acquiring a slot: a request queued behind the one that got the
                # 429 must wait too, and holding the slot meanwhile is right (everyone pauses)
                while (pause := state.resume_at - state.loop.time()) > 0:
                    await asyncio.sleep(pause)
                if messages is None:
                    try:  # encoding is CPU work: keep the event loop serving other requests
                        messages = await asyncio.to_thread(self.build_messages, request)
                    except ImageError as e:
                        return self._final(request, TeacherError(
                            e.reason, f"request {request.key}: image: {e.message}"))
                outcome = await self._attempt(request, messages, state)
            if isinstance(outcome, TeacherResponse):
                self.stats["successes"] += 1
                return outcome
            if not outcome.error.retryable or attempt == attempts - 1:
                return self._final(request, outcome.error, attempt + 1)
            if outcome.retry_after_s is not None:
                delay = min(outcome.retry_after_s, self.config.backoff_max_s)
                state.resume_at = max(state.resume_at, state.loop.time() + delay)
            else:
                delay = backoff_delay(attempt, self.config.backoff_base_s,
                                      self.config.backoff_max_s, self._rng)
            self.stats["retries"] += 1
            log.info("teacher %s: request %s attempt %d/%d failed (%s); retry in %.2fs",
                     self.model, request.key, attempt + 1, attempts, outcome.error.message, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt always returns")

    def _final(self, request: TeacherRequest, error: TeacherError,
               attempts: int = 1) -> TeacherError:
        self.stats[f"failed:{error.reason}"] += 1
        if attempts > 1:
            error.message = f"{error.message} (after {attempts} attempts)"
            error.args = (f"{error.reason}: {error.message}",)
        log.warning("teacher %s: request %s failed for good: %s", self.model, request.key, error)
        return error

    async def _attempt(self, request: TeacherRequest, messages: list[dict],
                       state: _LoopState) -> TeacherResponse | _Failed:
        named = {k: v for k, v in request.sampling.items() if k in CHAT_PARAMS and k != "n"}
        extra = {k: v for k, v in request.sampling.items() if k not in CHAT_PARAMS}
        started = time.perf_counter()
        failure: _Failed | None = None
        fatal: str | None = None
        completion: Any = None
        connection_failed = refused = False
        try:
            async with asyncio.timeout(self.config.timeout_s):
                completion = await state.client.chat.completions.create(
                    model=self.config.model, messages=messages, extra_body=extra or None, **named)
        except (openai.APITimeoutError, TimeoutError):
            failure = self._failed("teacher_timeout", f"no response within {self.config.timeout_s}s")
        except openai.APIConnectionError as e:
            failure = self._failed("teacher_failed", f"connection error ({type(e).__name__})")
            connection_failed = True
        except openai.APIStatusError as e:
            status, headers, body = e.status_code, e.response.headers, self._body_text(e)
            if status in FATAL_STATUS:
                fatal = (f"teacher {self.model} at {self.config.base_url}: HTTP {status} "
                         + FATAL_STATUS[status].replace("${env}", self.config.api_key_env)
                         + f": {body}")
            elif status == 429:
                failure = self._failed("teacher_rate_limited", f"HTTP 429: {body}",
                                       retry_after_s=parse_retry_after(headers))
            elif status >= 500 or status in (408, 409):
                failure = self._failed("teacher_timeout" if status == 408 else "teacher_failed",
                                       f"HTTP {status}: {body}",
                                       retry_after_s=parse_retry_after(headers))
            else:  # 400/413/422...: this request is wrong; sending it again cannot help
                failure = self._failed("teacher_failed", f"HTTP {status}: {body}", retryable=False)
                refused = True
        except (openai.APIResponseValidationError, ValueError) as e:  # JSONDecodeError included
            failure = self._failed("teacher_malformed", f"unparseable body ({type(e).__name__})")
        if fatal is not None:
            raise TeacherFatalError(self._redact(fatal))
        if connection_failed:  # may trip the breaker: outside the except, so no exception
            self.breaker.connection_failed(failure.error.message)  # context carries the request
        if refused:
            self.breaker.refused(failure.error.message)
        if failure is not None:
            return failure
        parsed = self._parse(request, completion, time.perf_counter() - started)
        if isinstance(parsed, TeacherResponse):
            self.breaker.success()
        return parsed

    def _failed(self, reason: str, message: str, retryable: bool = True,
                retry_after_s: float | None = None) -> _Failed:
        return _Failed(TeacherError(reason, self._redact(message), retryable), retry_after_s)

    def _body_text(self, error: openai.APIStatusError) -> str:
        body = error.body
        if isinstance(body, dict):
            inner = body.get("error", body)
            body = inner.get("message", inner) if isinstance(inner, dict) else inner
        return self._redact(str(body if body is not None else error.message))

    def _parse(self, request: TeacherRequest, completion: Any,
               latency_s: float) -> TeacherResponse | _Failed:
        return self.parse_completion(completion, request.sampling.get("max_tokens"), latency_s)

    def parse_completion(self, completion: Any, max_tokens: int | None = None,
                         latency_s: float = 0.0) -> TeacherResponse | _Failed:
        """A chat completion (online, or the body of a batch output line) as a response, or as a
        failure whose ``error.retryable`` says whether sending it again may help."""
        try:
            if not isinstance(completion, ChatCompletion) or not completion.choices:
                raise TypeError("no choices")
            choice = completion.choices[0]
            text = choice.message.content
            reasoning = reasoning_of(choice.message)
            finish_reason = choice.finish_reason or "stop"
            usage = completion.usage
            prompt_tokens = int(usage.prompt_tokens) if usage else 0
            completion_tokens = int(usage.completion_tokens) if usage else 0
        except (AttributeError, TypeError, IndexError, ValueError) as e:
            return self._failed("teacher_malformed", f"response without a usable choice ({e})")
        if finish_reason == "length":
            failure = self._failed("teacher_truncated", f"hit max_tokens="
                                   f"{max_tokens} (finish_reason length)",
                                   retryable=False)
            failure.error.prompt_tokens, failure.error.completion_tokens = (  # type: ignore[attr-defined]
                prompt_tokens, completion_tokens)
            return failure
        if finish_reason == "content_filter":
            return self._failed("teacher_refused", "finish_reason content_filter", retryable=False)
        if not (isinstance(text, str) and text.strip()) and not reasoning:
            return self._failed("teacher_malformed", "empty message content")
        return TeacherResponse(text=text if isinstance(text, str) else "", prompt_tokens=prompt_tokens,
                               completion_tokens=completion_tokens, finish_reason=finish_reason,
                               model=str(completion.model or self.config.model),
                               latency_s=latency_s, reasoning=reasoning)
