"""The teacher interface: a stage hands a batch of requests, gets text or a typed failure back.

Backends (see the registry in :mod:`pipeline.synthesis.teachers`) are interchangeable per
stage by config.
Images travel as raw bytes on the request; each backend encodes them as it needs (data URLs for
HTTP, PIL images for vLLM offline, nothing for the programmatic teacher, which reads the scene).
In ``messages`` an image is the content part ``{"type": "image", "index": i}`` (i-th image).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Backend = Literal["openai", "vllm", "programmatic"]


@dataclass
class TeacherConfig:
    backend: Backend = field(default="programmatic", metadata={"help": "openai | vllm | programmatic"})
    model: str = field(default="avar-programmatic-v1", metadata={"help": "Model id sent to the backend."})
    base_url: str | None = field(default=None, metadata={"volatile": True, "help": "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"volatile": True, "help": "Name of the environment variable holding the API key (the key itself never goes in a config)."})
    max_concurrency: int = field(default=16, metadata={"volatile": True, "help": "Requests in flight at once."})
    timeout_s: float = field(default=120.0, metadata={"volatile": True, "help": "Per-request timeout in seconds."})
    max_retries: int = field(default=6, metadata={"volatile": True, "help": "Retries on 5xx, 429, timeouts and connection errors."})
    backoff_base_s: float = field(default=1.0, metadata={"volatile": True, "help": "First back-off delay; doubles each retry, with full jitter."})
    backoff_max_s: float = field(default=60.0, metadata={"volatile": True, "help": "Cap on one back-off delay."})
    max_pixels: int | None = field(default=1_003_520, metadata={"help": "Images are downscaled to at most this many pixels before sending."})
    price_input_per_mtok: float = field(default=0.0, metadata={"volatile": True, "help": "USD per million prompt tokens (cost estimate)."})
    price_output_per_mtok: float = field(default=0.0, metadata={"volatile": True, "help": "USD per million completion tokens (cost estimate)."})
    vllm_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Extra kwargs for vllm.LLM (tensor_parallel_size, max_model_len, ...)."})

    def __post_init__(self):
        # Checked here, not only in a backend, so a config file fails at load time (with the full
        # key path, via pipeline.configio) instead of in the middle of a run.
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        for name in ("backoff_base_s", "backoff_max_s", "price_input_per_mtok", "price_output_per_mtok"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels: must be >= 1 or null, got {self.max_pixels}")

    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "EMPTY")

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
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    model: str = ""
    latency_s: float = 0.0


class TeacherError(Exception):
    """A request that failed for good (after retries). ``reason`` is a reject reason code."""

    def __init__(self, reason: str, message: str, retryable: bool = False):
        self.reason, self.message, self.retryable = reason, message, retryable
        super().__init__(f"{reason}: {message}")


OnResult = Callable[[int, "TeacherResponse | TeacherError"], None]


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

    async def aclose(self) -> None:
        pass


def replace_image_parts(request: TeacherRequest, make_part: Callable[[bytes], dict]) -> list[dict]:
    """``request.messages`` with each ``{"type": "image", "index": i}`` part replaced by
    ``make_part(request.images[i])`` (a data URL for HTTP, a PIL image for vLLM)."""
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
