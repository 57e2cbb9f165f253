"""The OpenAI files + batches protocol for the test teacher server (:mod:`tests.support.teacher_server`).

``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files`` (``after``/``limit``, newest
first), ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``POST /v1/batches``,
``GET /v1/batches/{id}``, ``GET /v1/batches`` (``after``/``limit``), ``POST
/v1/batches/{id}/cancel``. Each line of a batch is answered by the server's own chat completion
(:meth:`TeacherServer.complete`), so the responder, the per-request faults and the success
counter ("paid once") are the same as online.

A batch moves one step each time its status is read (``GET /v1/batches/{id}``), which makes
every status observable and the tests deterministic: ``validating`` (``validating_polls``
reads), ``in_progress`` (``lines_per_poll`` lines answered per read), ``finalizing``
(``finalizing_polls`` reads), then ``completed`` (``steps_per_read`` steps per read: 4 finishes a
batch at its first read). :class:`BatchBehaviour` adds what providers
do: expiry after some lines (the rest go to the error file as ``batch_expired``), an
enqueued-token limit (a batch over it fails with ``token_limit_exceeded``), a file size limit
(HTTP 413), cancel (``cancelling`` then ``cancelled``, finished lines kept). Output lines come in
reverse input order, as providers do not promise order: a client must match by ``custom_id``.

For kill -9 tests, :meth:`BatchService.hold` makes one kind of call (``upload``, ``create``,
``content``) do its work and then wait before answering, until :meth:`BatchService.release`:
a client killed meanwhile has changed the server's state without hearing of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

TERMINAL = ("completed", "failed", "expired", "cancelled")
HOLD_POINTS = ("upload", "create", "content")


@dataclass
class BatchBehaviour:
    """How the server's Batch API behaves (change it between calls of a test)."""

    validating_polls: int = 1
    lines_per_poll: int | None = None  # None: every line on the first in_progress read
    steps_per_read: int = 1  # 4: a batch goes from validating to completed in one read
    finalizing_polls: int = 1
    expire_after_lines: int | None = None
    expirations: int = 1_000_000  # how many batches may still expire (then they complete)
    token_limit: int | None = None
    max_file_bytes: int | None = None


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def public(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict
    lines: list[tuple[str, dict]]
    tokens: int
    created_at: int
    status: str = "validating"
    reads: int = 0  # reads in the current status
    done: dict[str, tuple[int, dict]] = field(default_factory=dict)
    errors: list[dict] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int] = field(default_factory=dict)

    def public(self) -> dict:
        ok = sum(1 for status, _ in self.done.values() if status == 200)
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint,
                "input_file_id": self.input_file_id, "completion_window": self.completion_window,
                "status": self.status, "output_file_id": self.output_file_id,
                "error_file_id": self.error_file_id, "created_at": self.created_at,
                "metadata": self.metadata, **self.times,
                "errors": {"object": "list", "data": self.errors} if self.errors else None,
                "request_counts": {"total": len(self.lines), "completed": ok,
                                   "failed": len(self.done) - ok}}


class BatchService:
    """The files and batches of one :class:`~tests.support.teacher_server.TeacherServer`."""

    def __init__(self, server):
        self.server = server
        self.behaviour = BatchBehaviour()
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}
        self._lock = threading.Lock()
        self._ids = Counter()
        self.uploads_by_name: Counter[str] = Counter()
        self.uploads_by_content: Counter[str] = Counter()
        self.batches_by_file: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.refusals: Counter[int] = Counter()
        self._held: set[str] = set()
        self._advancing: dict[str, asyncio.Lock] = {}
        self.holding: Counter[str] = Counter()  # calls waiting at each hold point

    # -- test controls -----------------------------------------------------------------------

    def hold(self, *points: str) -> None:
        unknown = set(points) - set(HOLD_POINTS)
        if unknown:
            raise ValueError(f"unknown hold point(s) {sorted(unknown)}; known: {HOLD_POINTS}")
        with self._lock:
            self._held = set(points)

    def release(self) -> None:
        with self._lock:
            self._held = set()

    def input_uploads(self) -> Counter[str]:
        """Uploads per distinct input content (a file uploaded twice shows a 2)."""
        with self._lock:
            return Counter(self.uploads_by_content)

    def lines_submitted(self) -> Counter[str]:
        """custom_id -> number of batches created with it (the request set of every batch)."""
        with self._lock:
            return Counter(cid for b in self.batches.values() for cid, _ in b.lines)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files", self._list_files)
        app.router.add_get("/v1/files/{id}", self._file)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list_batches)
        app.router.add_get("/v1/batches/{id}", self._retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)

    # -- helpers -----------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        self._ids[prefix] += 1
        return f"{prefix}-{self._ids[prefix]:06d}"

    async def _maybe_hold(self, point: str) -> None:
        with self._lock:
            if point not in self._held:
                return
            self.holding[point] += 1
        try:
            while True:
                with self._lock:
                    if point not in self._held:
                        return
                await asyncio.sleep(0.01)
        finally:
            with self._lock:
                self.holding[point] -= 1

    def _refuse(self, status: int, message: str, code: str | None = None) -> web.Response:
        self.refusals[status] += 1
        return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                            "code": code or status}}, status=status)

    @staticmethod
    def _page(items: list[dict], request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", 20))
        after = request.query.get("after")
        start = next((i + 1 for i, item in enumerate(items) if item["id"] == after), 0) if after else 0
        page = items[start:start + limit]
        return web.json_response({"object": "list", "data": page, "has_more": start + limit < len(items),
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None})

    # -- files -------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        self.calls["upload"] += 1
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or not hasattr(upload, "file"):
            return self._refuse(400, "no file in the multipart body")
        data = upload.file.read()
        limit = self.behaviour.max_file_bytes
        if limit is not None and len(data) > limit:
            return self._refuse(413, f"file of {len(data)} bytes is over the limit of {limit} bytes")
        if purpose != "batch":
            return self._refuse(400, f"purpose must be batch here, got {purpose!r}")
        with self._lock:
            entry = _File(self._new_id("file"), upload.filename, purpose, data, int(time.time()))
            self.files[entry.id] = entry
            self.uploads_by_name[entry.filename] += 1
            self.uploads_by_content[hashlib.sha256(data).hexdigest()] += 1
        await self._maybe_hold("upload")
        return web.json_response(entry.public())

    async def _list_files(self, request: web.Request) -> web.Response:
        self.calls["list_files"] += 1
        purpose = request.query.get("purpose")
        with self._lock:
            items = [f.public() for f in reversed(self.files.values()) if purpose in (None, f.purpose)]
        return self._page(items, request)

    async def _file(self, request: web.Request) -> web.Response:
        entry = self.files.get(request.match_info["id"])
        if entry is None:
            return self._refuse(404, f"no such file {request.match_info['id']}")
        return web.json_response(entry.public())

    async def _content(self, request: web.Request) -> web.Response:
        self.calls["content"] += 1
        entry = self.files.get(request.match_info["id"])
        if entry is None:
            return self._refuse(404, f"no such file {request.match_info['id']}")
        if entry.purpose == "batch_output":
            await self._maybe_hold("content")
        return web.Response(body=entry.data, content_type="application/octet-stream")

    # -- batches -----------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        self.calls["create"] += 1
        body = await request.json()
        entry = self.files.get(body.get("input_file_id"))
        if entry is None:
            return self._refuse(400, f"input_file_id {body.get('input_file_id')!r} does not exist")
        if body.get("endpoint") != "/v1/chat/completions":
            return self._refuse(400, f"endpoint {body.get('endpoint')!r} is not supported")
        try:
            lines = [json.loads(line) for line in entry.data.decode().splitlines() if line.strip()]
            parsed = [(line["custom_id"], line["body"]) for line in lines]
        except (ValueError, KeyError, TypeError) as e:
            return self._refuse(400, f"input file is not batch JSONL: {type(e).__name__}: {e}")
        if len({cid for cid, _ in parsed}) != len(parsed):
            return self._refuse(400, "custom_id values must be unique within a batch")
        with self._lock:
            batch = _Batch(self._new_id("batch"), entry.id, body["endpoint"],
                           str(body.get("completion_window", "24h")), dict(body.get("metadata") or {}),
                           parsed, sum(_tokens(b) for _, b in parsed), int(time.time()))
            self.batches[batch.id] = batch
            self.batches_by_file[entry.id] += 1
        await self._maybe_hold("create")
        return web.json_response(batch.public())

    async def _list_batches(self, request: web.Request) -> web.Response:
        self.calls["list_batches"] += 1
        with self._lock:
            items = [b.public() for b in reversed(self.batches.values())]
        return self._page(items, request)

    async def _retrieve(self, request: web.Request) -> web.Response:
        self.calls["retrieve"] += 1
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return self._refuse(404, f"no such batch {request.match_info['id']}")
        lock = self._advancing.setdefault(batch.id, asyncio.Lock())
        async with lock:  # two reads at once must not answer a line twice
            for _ in range(self.behaviour.steps_per_read):
                if batch.status in TERMINAL:
                    break
                await self._advance(batch)
            public = batch.public()
        return web.json_response(public)

    async def _cancel(self, request: web.Request) -> web.Response:
        self.calls["cancel"] += 1
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return self._refuse(404, f"no such batch {request.match_info['id']}")
        if batch.status not in TERMINAL:
            self._enter(batch, "cancelling")
        return web.json_response(batch.public())

    # -- progression -------------------------------------------------------------------------

    def _enter(self, batch: _Batch, status: str) -> None:
        batch.status, batch.reads = status, 0
        batch.times[f"{status}_at"] = int(time.time())

    def _enqueued(self, other_than: _Batch) -> int:
        return sum(b.tokens for b in self.batches.values()
                   if b is not other_than and b.status in ("in_progress", "finalizing"))

    async def _advance(self, batch: _Batch) -> None:
        behaviour = self.behaviour
        batch.reads += 1
        if batch.status == "validating" and batch.reads >= behaviour.validating_polls:
            limit = behaviour.token_limit
            if limit is not None and self._enqueued(batch) + batch.tokens > limit:
                batch.errors = [{"code": "token_limit_exceeded", "line": None, "param": None,
                                 "message": f"Enqueued token limit reached for {batch.lines[0][1].get('model')}. "
                                            f"Limit: {limit:,} enqueued tokens. Please try again once some "
                                            "in_progress batches have been completed."}]
                self._enter(batch, "failed")
            else:
                self._enter(batch, "in_progress")
        elif batch.status == "in_progress":
            todo = [(cid, body) for cid, body in batch.lines if cid not in batch.done]
            expiring = behaviour.expire_after_lines is not None and behaviour.expirations > 0
            for cid, body in todo[:behaviour.lines_per_poll or len(todo)]:
                status, payload, _ = await self.server.complete(body, batch=True)
                batch.done[cid] = (status, payload)
                if expiring and len(batch.done) >= behaviour.expire_after_lines:
                    break
            if behaviour.expire_after_lines is not None and len(batch.done) >= behaviour.expire_after_lines \
                    and len(batch.done) < len(batch.lines) and behaviour.expirations > 0:
                behaviour.expirations -= 1
                self._finish(batch, "expired")
            elif len(batch.done) == len(batch.lines):
                self._enter(batch, "finalizing")
        elif batch.status == "finalizing" and batch.reads >= behaviour.finalizing_polls:
            self._finish(batch, "completed")
        elif batch.status == "cancelling":
            self._finish(batch, "cancelled")

    def _finish(self, batch: _Batch, status: str) -> None:
        """Write the output file (answered lines) and the error file (failed lines, and lines that
        never ran), in reverse input order; then enter ``status``."""
        output, errors = [], []
        missing_code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        for n, (cid, _) in enumerate(reversed(batch.lines)):
            line_id = f"batch_req_{batch.id}_{n}"
            if cid in batch.done:
                code, payload = batch.done[cid]
                line = {"id": line_id, "custom_id": cid, "error": None,
                        "response": {"status_code": code, "request_id": f"req_{n}", "body": payload}}
                (output if code == 200 else errors).append(line)
            elif missing_code:
                errors.append({"id": line_id, "custom_id": cid, "response": None, "error": {
                    "code": missing_code, "message": f"This request was not executed ({missing_code})."}})
        with self._lock:
            for lines, attr in ((output, "output_file_id"), (errors, "error_file_id")):
                if lines:
                    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
                    entry = _File(self._new_id("file"), f"{batch.id}_{attr}.jsonl", "batch_output",
                                  data, int(time.time()))
                    self.files[entry.id] = entry
                    setattr(batch, attr, entry.id)
        self._enter(batch, status)


def _tokens(body: dict) -> int:
    """The server's token estimate of a request: words of its text, 256 per image, max_tokens."""
    words = images = 0
    for message in body.get("messages") or []:
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if part.get("type") == "text":
                words += len(str(part.get("text", "")).split())
            elif part.get("type") == "image_url":
                images += 1
    return words + 256 * images + int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
