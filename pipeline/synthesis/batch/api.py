"""The OpenAI files + batches protocol, as the runner needs it, over the ``openai`` client.

Calls go through one retry policy, the online teacher's (``max_retries``, full-jitter back-off,
``Retry-After``, the circuit breaker for connection failures; the client's own retries are off):

* 5xx, 408, 409, 429, timeouts and connection errors are retried;
* 401/403/404 raise :class:`~pipeline.synthesis.teachers.base.TeacherFatalError` (a wrong key,
  URL, or an endpoint without the Batch API);
* any other 4xx raises :class:`ApiRefused` for the runner to handle (a 413 splits the file; the
  rest go to the circuit breaker).

The two calls that create something (upload a file, create a batch) are never simply repeated:
after a failure whose outcome is unknown (a timeout, a dropped connection, a 5xx) the runner's
``find`` callback looks for what the first try may have made (the file by its unique name, the
batch by the job id in its metadata) before trying again, so a lost answer never makes a second
file or a second batch.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from pipeline.atomic import atomic_file
from pipeline.synthesis.batch.lines import ENDPOINT
from pipeline.synthesis.teachers.base import TeacherFatalError
from pipeline.synthesis.teachers.openai_backend import (
    FATAL_STATUS,
    backoff_delay,
    parse_retry_after,
)

log = logging.getLogger(__name__)
UPLOAD_BYTES_PER_S = 250_000  # the upload timeout allows 2 Mbit/s on top of timeout_s


class ApiRefused(Exception):
    """The provider refused a call with an HTTP 4xx that a retry would only repeat."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(f"HTTP {status}: {message}")


class ApiUnavailable(RuntimeError):
    """A call kept failing for transient reasons (5xx, timeouts): the task may be retried later;
    the batch state says where it stopped."""


@dataclass
class RemoteBatch:
    """What the provider says about a batch."""

    id: str
    status: str
    input_file_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    metadata: dict = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (code, message)

    @classmethod
    def of(cls, batch: Any) -> RemoteBatch:
        counts = getattr(batch, "request_counts", None)
        errors = getattr(getattr(batch, "errors", None), "data", None) or []
        return cls(id=batch.id, status=batch.status, input_file_id=batch.input_file_id,
                   output_file_id=batch.output_file_id, error_file_id=batch.error_file_id,
                   total=getattr(counts, "total", 0) or 0, completed=getattr(counts, "completed", 0) or 0,
                   failed=getattr(counts, "failed", 0) or 0, metadata=dict(batch.metadata or {}),
                   errors=[(str(e.code or ""), str(e.message or "")) for e in errors])


class OpenAIBatchAPI:
    """Files and batches at ``teacher.config.base_url`` (``teacher``: an OpenAITeacher, whose
    retry settings, breaker and redaction are used)."""

    name = "openai"
    max_poll_s: float | None = None  # back off up to batch.poll_max_s

    def __init__(self, teacher, rng: random.Random | None = None, sleep: Callable[[float], None] = time.sleep):
        self.teacher, self.config = teacher, teacher.config
        self.endpoint = self.config.base_url or "https://api.openai.com/v1"
        self._rng = rng or random.Random()
        self._sleep = sleep
        self.client = openai.OpenAI(base_url=self.config.base_url, api_key=self.config.api_key(),
                                    max_retries=0, timeout=self.config.timeout_s)

    # -- the retry policy --------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any], find: Callable[[], Any] | None = None) -> Any:
        """``fn()`` under the retry policy; before each retry, ``find()`` may return what an
        earlier try already made (then that is the result)."""
        attempts = self.config.max_retries + 1
        detail = ""
        for attempt in range(attempts):
            if attempt and find is not None:
                found = find()
                if found is not None:
                    log.info("%s: found what an earlier try made; not sent again", what)
                    return found
            fatal = refused = None
            retry_after = None
            try:
                result = fn()
                self.teacher.breaker.connected()  # not success(): a batch call is no answer
                return result
            except (openai.APITimeoutError, TimeoutError):
                detail = f"no answer within {self.config.timeout_s}s"
            except openai.APIConnectionError as e:
                detail = f"connection error ({type(e).__name__})"
            except openai.APIStatusError as e:
                status, body = e.status_code, self.teacher.error_detail(e)
                if status in FATAL_STATUS:
                    fatal = (f"teacher {self.config.model} at {self.endpoint}: {what} answered HTTP {status} "
                             + FATAL_STATUS[status].replace("${env}", self.config.api_key_env) + f": {body}"
                             + ("; an endpoint without the Batch API (/v1/files, /v1/batches) answers "
                                "404 too: use mode online there" if status == 404 else ""))
                elif status == 429 or status >= 500 or status in (408, 409):
                    detail, retry_after = f"HTTP {status}: {body}", parse_retry_after(e.response.headers)
                else:
                    refused = ApiRefused(status, body)
            if fatal is not None:
                raise TeacherFatalError(self.teacher.redact(fatal))
            if refused is not None:
                raise refused
            if detail.startswith("connection error"):
                self.teacher.breaker.connection_failed(detail)
            if attempt < attempts - 1:
                delay = min(retry_after, self.config.backoff_max_s) if retry_after is not None else \
                    backoff_delay(attempt, self.config.backoff_base_s, self.config.backoff_max_s, self._rng)
                log.info("%s failed (%s); retry %d/%d in %.2fs", what, detail, attempt + 1, attempts - 1, delay)
                self._sleep(delay)
        raise ApiUnavailable(self.teacher.redact(f"teacher {self.config.model} at {self.endpoint}: {what} "
                                                 f"failed {attempts} times: {detail}"))

    # -- files -------------------------------------------------------------------------------

    def upload(self, path: Path, filename: str) -> str:
        timeout = self.config.timeout_s + Path(path).stat().st_size / UPLOAD_BYTES_PER_S

        def send() -> str:
            with open(path, "rb") as fh:
                return self.client.with_options(timeout=timeout).files.create(
                    file=(filename, fh), purpose="batch").id
        return self._call(f"POST /files ({filename})", send, find=lambda: self.find_file(filename))

    def find_file(self, filename: str, scan: int = 10_000) -> str | None:
        """The id of an uploaded batch file named ``filename`` (newest first), or None."""
        def scan_files() -> str | None:
            for n, entry in enumerate(self.client.files.list(purpose="batch")):
                if entry.filename == filename:
                    return entry.id
                if n >= scan:
                    break
            return None
        return self._call("GET /files", scan_files)

    def download(self, file_id: str, dest: Path) -> Path:
        def fetch() -> Path:
            with self.client.files.with_streaming_response.content(file_id) as response, \
                    atomic_file(dest) as fh:
                for chunk in response.iter_bytes(1 << 20):
                    fh.write(chunk)
            return dest
        return self._call(f"GET /files/{file_id}/content", fetch)

    # -- batches -----------------------------------------------------------------------------

    def create(self, file_id: str, metadata: dict[str, str], completion_window: str) -> RemoteBatch:
        job = metadata.get("avar_job", "")
        return RemoteBatch.of(self._call(
            f"POST /batches ({file_id})",
            lambda: self.client.batches.create(input_file_id=file_id, endpoint=ENDPOINT,
                                               completion_window=completion_window, metadata=metadata),
            find=lambda: self._find_batch(job)))

    def _find_batch(self, job: str, scan: int = 10_000):
        for n, batch in enumerate(self.client.batches.list(limit=100)):
            if (batch.metadata or {}).get("avar_job") == job:
                return batch
            if n >= scan:
                break
        return None

    def find_batch(self, job: str) -> RemoteBatch | None:
        """The batch whose metadata names job ``job``, or None."""
        found = self._call("GET /batches", lambda: self._find_batch(job))
        return RemoteBatch.of(found) if found is not None else None

    def retrieve(self, batch_id: str) -> RemoteBatch:
        return RemoteBatch.of(self._call(f"GET /batches/{batch_id}", lambda: self.client.batches.retrieve(batch_id)))

    def cancel(self, batch_id: str) -> RemoteBatch:
        return RemoteBatch.of(self._call(f"POST /batches/{batch_id}/cancel",
                                         lambda: self.client.batches.cancel(batch_id)))

    def list_batches(self, limit: int) -> Iterator[RemoteBatch]:
        """The account's newest ``limit`` batches (paged with ``after``)."""
        def first_page():
            return self.client.batches.list(limit=min(100, max(1, limit)))
        page = self._call("GET /batches", first_page)
        seen = 0
        while page is not None:
            for batch in page.data:
                yield RemoteBatch.of(batch)
                seen += 1
                if seen >= limit:
                    return
            page = self._call("GET /batches", page.get_next_page) if page.has_next_page() else None

    def close(self) -> None:
        self.client.close()
