"""The teacher interface: a stage hands a batch of requests, gets text or a typed failure back.

Backends (see the registry in :mod:`pipeline.synthesis.teachers`) are interchangeable per
stage by config.
Images travel as raw bytes on the request; each backend encodes them as it needs (data URLs for
HTTP, nothing for the programmatic teacher, which reads the scene). vLLM is a server in its own
environment (``vllm serve``, or the flow starts one: ``teacher.serve``,
:mod:`pipeline.synthesis.vllm_server`), reached with the openai backend.
In ``messages`` an image is the content part ``{"type": "image", "index": i}`` (i-th image).
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.configio import ConfigError
from pipeline.errors import PermanentError
from pipeline.synthesis.batch.config import BatchConfig
from pipeline.synthesis.vllm_server import ServeConfig

Backend = Literal["openai", "programmatic"]
Modality = Literal["vision", "text"]
Mode = Literal["online", "batch"]


@dataclass
class TeacherConfig:
    backend: Backend = field(default="programmatic", metadata={"help": "openai (any OpenAI-compatible server: vLLM, SGLang, an API) | programmatic (reads the scene, no model)"})
    model: str = field(default="avar-programmatic-v1", metadata={"help": "Model id sent to the backend."})
    base_url: str | None = field(default=None, metadata={"volatile": True, "help": "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"volatile": True, "help": "Name of the environment variable holding the API key (the key itself never goes in a config)."})
    max_concurrency: int = field(default=16, metadata={"volatile": True, "help": "Requests in flight at once."})
    timeout_s: float = field(default=120.0, metadata={"volatile": True, "help": "Per-request timeout in seconds."})
    max_retries: int = field(default=6, metadata={"volatile": True, "help": "Retries on 5xx, 429, timeouts and connection errors."})
    backoff_base_s: float = field(default=1.0, metadata={"volatile": True, "help": "First back-off delay; doubles each retry, with full jitter."})
    backoff_max_s: float = field(default=60.0, metadata={"volatile": True, "help": "Cap on one back-off delay."})
    modality: Modality | None = field(default=None, metadata={
        "help": "What the teacher reads: 'vision' (the images are sent: a VLM) or 'text' (no image "
                "parts; it reads the question and the describe stage's text: an LLM). null = the "
                "stage's default, the paper's layout: describe vision, reason and anchor text."})
    max_pixels: int | None = field(default=1_003_520, metadata={"help": "Images are downscaled to at most this many pixels before sending."})
    breaker_after: int = field(default=20, metadata={"volatile": True, "help":
        "Circuit breaker: stop the stage with one error when the same refusal (an HTTP 4xx other "
        "than 429, numbers ignored) comes back this many times in a row, or this many attempts in "
        "a row cannot connect; 0 = never. A re-run after the fix continues (answers are cached)."})
    price_input_per_mtok: float = field(default=0.0, metadata={"volatile": True, "help": "USD per million prompt tokens (cost estimate)."})
    price_output_per_mtok: float = field(default=0.0, metadata={"volatile": True, "help": "USD per million completion tokens (cost estimate)."})
    serve: ServeConfig | None = field(default=None, metadata={"volatile": True, "help":
        "Managed vLLM: the flow starts vLLM's OpenAI server from this environment on 127.0.0.1, "
        "sets base_url to it, and stops it at the end (backend openai; one machine). With mode "
        "batch, vLLM's offline batch engine (run-batch) runs on each batch file instead."})
    mode: Mode = field(default="online", metadata={"volatile": True, "help":
        "online: one HTTP request per sample; batch: the stage's requests go as JSONL files "
        "through the provider's Batch API (/v1/files + /v1/batches; about half price, results "
        "within the completion window), or through vLLM's offline batch engine when serve is "
        "set. Same request cache, records and rejects either way (backend openai)."})
    batch_discount: float = field(default=0.5, metadata={"volatile": True, "help":
        "Mode batch: the cost estimate is the prices times this factor (the providers' Batch "
        "APIs charge about half)."})
    batch: BatchConfig = field(default_factory=BatchConfig, metadata={"volatile": True, "help":
        "Mode batch: file limits, polling, resubmission (see pipeline.synthesis.batch)."})

    def __post_init__(self):
        # Checked here, not only in a backend, so a config file fails at load time (with the full
        # key path, via pipeline.configio) instead of in the middle of a run.
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.breaker_after < 0:
            raise ValueError(f"breaker_after: must be >= 0, got {self.breaker_after}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        for name in ("backoff_base_s", "backoff_max_s", "price_input_per_mtok", "price_output_per_mtok"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.serve is not None and self.backend != "openai":
            raise ValueError(f"serve: a managed vLLM server is reached with backend openai, got {self.backend!r}")
        if self.mode == "batch" and self.backend != "openai":
            raise ValueError(f"mode: batch needs backend openai (the OpenAI files/batches protocol), "
                             f"got {self.backend!r}")
        if not 0 <= self.batch_discount <= 1:
            raise ValueError(f"batch_discount: must be within 0-1, got {self.batch_discount}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels: must be >= 1 or null, got {self.max_pixels}")

    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "EMPTY")

    def price_factor(self) -> float:
        """What the prices are multiplied by: ``batch_discount`` in mode batch, else 1."""
        return self.batch_discount if self.mode == "batch" else 1.0

    def public(self) -> dict:
        """What may be written to provenance, logs and cards (never a secret)."""
        return {"backend": self.backend, "model": self.model}


@dataclass
class TeacherRequest:
    key: str  # request-cache key (pipeline.synthesis.cache.request_key)
    stage: str  # describe | reason | anchor | ...
    messages: list[dict]  # OpenAI chat format; images as {"type": "image", "index": i}
    images: list[bytes]
    sampling: dict[str, Any]  # temperature, top_p, max_tokens, seed, ...
    record: dict  # the sample so far: the programmatic teacher reads scene + earlier stages


@dataclass
class TeacherResponse:
    text: str  # the message content
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    model: str = ""
    latency_s: float = 0.0
    reasoning: str | None = None  # a reasoning model's separate chain (reasoning_content)


class TeacherError(Exception):
    """A request that failed for good (after retries). ``reason`` is a reject reason code."""

    def __init__(self, reason: str, message: str, retryable: bool = False):
        self.reason, self.message, self.retryable = reason, message, retryable
        super().__init__(f"{reason}: {message}")


OnResult = Callable[[int, "TeacherResponse | TeacherError"], None]


class TeacherFatalError(RuntimeError, PermanentError):
    """The endpoint refuses every request (bad key, unknown model, wrong URL, a server that is
    gone, the same 4xx again and again): stop the stage with one clear error instead of turning
    every remaining sample into a reject. Requests already answered stay cached."""


class TeacherSetupError(ConfigError):
    """A preflight check failed before any work; ``key`` is the config key to fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class CircuitBreaker:
    """Counts what says "every request will fail" and trips (raises :class:`TeacherFatalError`)
    at ``limit``: the same refusal in a row, or connection failures in a row. Any answer resets
    it. Refusals compare with numbers blanked, so "you requested 2100 tokens" and "... 2300
    tokens" are the same refusal."""

    def __init__(self, limit: int, where: str):
        self.limit, self.where = limit, where
        self.refusal: str | None = None
        self.refusals = 0
        self.connection_failures = 0

    def success(self) -> None:
        self.refusal, self.refusals, self.connection_failures = None, 0, 0

    def connected(self) -> None:
        """A call got through (a batch API call, not an answer): only the connection count resets."""
        self.connection_failures = 0

    def connection_failed(self, detail: str) -> None:
        self.connection_failures += 1
        if self.limit and self.connection_failures >= self.limit:
            raise TeacherFatalError(
                f"{self.where}: {self.connection_failures} attempts in a row could not connect "
                f"({detail}); the server is down or unreachable. Fix it and re-run: answered "
                "requests are cached and not sent again")

    def refused(self, detail: str) -> None:
        key = re.sub(r"\d+", "#", detail)[:200]
        self.refusals = self.refusals + 1 if key == self.refusal else 1
        self.refusal = key
        if self.limit and self.refusals >= self.limit:
            raise TeacherFatalError(
                f"{self.where}: the same refusal {self.refusals} times in a row: {detail}. Every "
                "request would get it; fix the setting it names and re-run (answered requests are "
                "cached, refused ones are not)")


class Teacher(ABC):
    def __init__(self, config: TeacherConfig):
        self.config = config

    @property
    def backend(self) -> str:
        return self.config.backend

    @property
    def model(self) -> str:
        return self.config.model

    @abstractmethod
    async def agenerate(self, requests: list[TeacherRequest],
                        on_result: OnResult | None = None) -> list[TeacherResponse | TeacherError]:
        """One result per request, in order. Never raises for a single request's failure.

        ``on_result(i, result)`` fires as each result is final (the stage commits it to the
        request cache at once, so a crash loses only the requests in flight).
        """

    def preflight(self, sampling: dict[str, Any], key_prefix: str = "teacher") -> None:
        """Check, before any work, that this teacher can serve requests with ``sampling``;
        raise :class:`TeacherSetupError` naming the key under ``key_prefix`` to fix. Backends
        without an endpoint have nothing to check."""

    async def aclose(self) -> None:
        pass


def replace_image_parts(request: TeacherRequest, make_part: Callable[[bytes], dict]) -> list[dict]:
    """``request.messages`` with each ``{"type": "image", "index": i}`` part replaced by
    ``make_part(request.images[i])`` (a data URL for HTTP)."""
    out = []
    for turn in request.messages:
        content = turn.get("content")
        if not isinstance(content, list):
            out.append(turn)
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                index = part.get("index")
                if not isinstance(index, int) or not 0 <= index < len(request.images):
                    raise ValueError(f"request {request.key}: messages: image part index "
                                     f"{index!r} out of range for {len(request.images)} image(s)")
                part = make_part(request.images[index])
            parts.append(part)
        out.append({**turn, "content": parts})
    return out
