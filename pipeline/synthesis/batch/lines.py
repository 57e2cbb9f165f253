"""Batch JSONL both ways: requests into input files cut at the limits, output lines into results.

An input line is ``{"custom_id": <request-cache key>, "method": "POST", "url":
"/v1/chat/completions", "body": <the chat request the online mode would send>}``: the same
messages (images as base64 data URLs, downscaled to ``max_pixels``) and sampling, with the
backend extras (``top_k``, ``structured_outputs``, ...) in the body as ``extra_body`` would put
them. Files are cut before the next line would pass any limit: request count, bytes (images
included, since they are in the line) or estimated tokens.

Output and error lines are matched to requests by ``custom_id`` only, never by position (a
provider writes them in any order, and a failed line shifts everything after it).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.synthesis.batch.state import LineRef
from pipeline.synthesis.teachers.base import TeacherError, TeacherRequest, TeacherResponse

ENDPOINT = "/v1/chat/completions"
MISSING_CODES = frozenset({"batch_expired", "batch_cancelled"})
_CHARS_PER_TOKEN = 4  # a rough, provider-neutral estimate; only limits and projections use it
_PIXELS_PER_IMAGE_TOKEN = 28 * 28  # Qwen-VL's patch merge; GPT-4o's tiles are about as dense


def line_body(teacher, request: TeacherRequest) -> dict:
    """The chat request body of ``request``, as ``teacher`` (an OpenAITeacher) would send it."""
    sampling = {k: v for k, v in request.sampling.items() if k != "n"}
    return {"model": teacher.config.model, "messages": teacher.build_messages(request), **sampling}


def encode_line(custom_id: str, body: dict) -> bytes:
    return (json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body},
                       ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def estimate_tokens(request: TeacherRequest, max_pixels: int | None) -> int:
    """Prompt text / 4 + image pixels / 784 (each capped at ``max_pixels``) + ``max_tokens``."""
    chars = 0
    for message in request.messages:
        content = message.get("content")
        parts = [content] if isinstance(content, str) else content or []
        chars += sum(len(p) if isinstance(p, str) else len(str(p.get("text", ""))) for p in parts)
    pixels = 0
    for image in request.images:
        try:
            with Image.open(io.BytesIO(image)) as img:  # reads the header only
                area = img.size[0] * img.size[1]
        except (OSError, ValueError):
            area = max_pixels or 0
        pixels += min(area, max_pixels) if max_pixels else area
    wanted = request.sampling.get("max_tokens") or request.sampling.get("max_completion_tokens") or 0
    return chars // _CHARS_PER_TOKEN + pixels // _PIXELS_PER_IMAGE_TOKEN + int(wanted)


@dataclass
class Limits:
    """Where a file is cut (``teacher.batch``; ``max_bytes`` may drop after an HTTP 413)."""

    max_requests: int
    max_bytes: int
    max_tokens: int | None = None


@dataclass
class FileSpec:
    """A finished input file: its job uid, path and lines."""

    uid: str
    path: Path
    lines: list[LineRef] = field(default_factory=list)
    n_bytes: int = 0
    est_tokens: int = 0


class FileWriter:
    """Appends lines to input files under ``folder``, starting a new file before a limit would
    be passed; :meth:`add` and :meth:`close` return each file once it is complete (fsynced)."""

    def __init__(self, folder: Path, limits: Limits):
        self.folder, self.limits = Path(folder), limits
        self.folder.mkdir(parents=True, exist_ok=True)
        self._spec: FileSpec | None = None
        self._fh = None

    def add(self, custom_id: str, line: bytes, tokens: int) -> FileSpec | None:
        done = None
        spec = self._spec
        if spec is not None and spec.lines and (
                len(spec.lines) >= self.limits.max_requests
                or spec.n_bytes + len(line) > self.limits.max_bytes
                or (self.limits.max_tokens is not None and spec.est_tokens + tokens > self.limits.max_tokens)):
            done = self.close()
        if self._spec is None:
            uid = uuid.uuid4().hex[:16]
            self._spec = FileSpec(uid, self.folder / f"{uid}.input.jsonl")
            self._fh = open(self._spec.path, "wb")  # noqa: SIM115 - closed in close()
        spec = self._spec
        spec.lines.append(LineRef(custom_id, spec.n_bytes, len(line)))
        self._fh.write(line)
        spec.n_bytes += len(line)
        spec.est_tokens += tokens
        return done

    def close(self) -> FileSpec | None:
        spec, fh = self._spec, self._fh
        self._spec = self._fh = None
        if fh is not None:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        return spec


def read_line(path: str | Path, ref: LineRef) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(ref.offset)
        return fh.read(ref.length)


def index_lines(path: str | Path) -> list[LineRef]:
    """The lines of an input file downloaded from the provider (a batch found by its metadata)."""
    refs, offset = [], 0
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                refs.append(LineRef(json.loads(raw)["custom_id"], offset, len(raw)))
            offset += len(raw)
    return refs


@dataclass
class LineResult:
    """What one output or error line says about its request.

    ``kind``: "ok" (``result`` is a response), "retry" (failed or never ran: send it again while
    attempts are left), "final" (an answer that another attempt would only pay for again:
    truncated or refused; ``result`` is the error). ``refusal`` is the HTTP 4xx detail the
    circuit breaker compares.
    """

    kind: str
    result: TeacherResponse | TeacherError
    refusal: str | None = None


def _error_text(response: dict | None, error) -> str:
    body = (response or {}).get("body")
    for candidate in (body, error):
        if isinstance(candidate, dict):
            inner = candidate.get("error", candidate)
            if isinstance(inner, dict) and inner.get("message"):
                code = inner.get("code")
                return f"{inner['message']}" + (f" ({code})" if isinstance(code, str) else "")
        elif isinstance(candidate, str) and candidate:
            return candidate
    return "no detail"


def parse_line(teacher, raw: dict) -> tuple[str, LineResult]:
    """``(custom_id, result)`` of one output or error line (``teacher``: an OpenAITeacher)."""
    from openai.types.chat import ChatCompletion
    from pydantic import ValidationError

    custom_id = str(raw.get("custom_id"))
    response, error = raw.get("response"), raw.get("error")
    status = (response or {}).get("status_code")
    if response is None or status is None:
        code = error.get("code") if isinstance(error, dict) else None
        reason = "teacher_failed"
        what = "did not run" if code in MISSING_CODES else "failed"
        return custom_id, LineResult("retry", TeacherError(reason, f"batch line {what}: {_error_text(None, error)}", True))
    if status != 200:
        text = f"HTTP {status}: {_error_text(response, error)}"
        reason = "teacher_rate_limited" if status == 429 else "teacher_timeout" if status in (408, 504) \
            else "teacher_failed"
        refusal = text if 400 <= status < 500 and status not in (408, 409, 429) else None
        return custom_id, LineResult("retry", TeacherError(reason, f"batch line {text}", True), refusal)
    try:
        completion = ChatCompletion.model_validate(response.get("body"))
    except ValidationError as e:
        return custom_id, LineResult("retry", TeacherError(
            "teacher_malformed", f"batch line body is not a chat completion ({e.error_count()} errors)", True))
    parsed = teacher.parse_completion(completion)
    if isinstance(parsed, TeacherResponse):
        return custom_id, LineResult("ok", parsed)
    return custom_id, LineResult("retry" if parsed.error.retryable else "final", parsed.error)


def iter_result_lines(path: str | Path) -> Iterator[dict]:
    """The JSON lines of a downloaded output or error file (a broken line is skipped: its
    request counts as missing and is resubmitted)."""
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and "custom_id" in line:
                yield line
