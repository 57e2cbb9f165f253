"""A real OpenAI-compatible chat server on 127.0.0.1 for tests and benchmarks, with faults on demand.

It serves ``POST /v1/chat/completions`` and ``GET /v1/models`` over aiohttp in a background
thread, and the Batch API (``/v1/files``, ``/v1/batches``: :mod:`tests.support.teacher_batches`,
``server.batches``), whose lines are answered like chat requests. Images arrive as base64 data
URLs; the server decodes them and recognises the seed record
by the sha256 of the decoded bytes (register seeds with :meth:`TeacherServer.register`). The stage
is read from the rendered prompt's heading line ``## Task: describe|reason|anchor``. The answer
comes from a pluggable responder; the default one runs the programmatic teacher on the seed.

Faults, drawn per request from a seeded generator keyed by (request hash, n-th arrival), or taken
in order from a script: ``500 502 503`` (JSON error), ``429`` (``Retry-After`` header), ``slow``
(no answer before the client gives up), ``malformed`` (cut-off JSON body), ``truncated``
(``finish_reason: "length"``), ``empty`` (no content), ``refused``
(``finish_reason: "content_filter"``). Counters prove that no successful request
was sent twice: ``success_counts`` is keyed by a hash of the whole request body.

In a test::

    with TeacherServer(latency_s=0.0) as server:
        server.register(seed_records)
        server.script("500", "429")          # the next two requests fail, then normal service
        server.faults({"503": 0.2})          # afterwards 20 % of requests get a 503
        teacher = OpenAITeacher(TeacherConfig(backend="openai", base_url=server.base_url))
        ...
        assert not server.duplicates()

As a process (kill -9 tests): ``python -m tests.support.teacher_server --port 0 --fault 500=0.2``
prints ``listening on http://127.0.0.1:PORT/v1``; ``POST /admin/register`` takes
``{"records": [...]}`` with image bytes base64-encoded (:func:`records_to_json`) and
``GET /admin/stats`` returns the counters.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import inspect
import io
import json
import random
import re
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web
from PIL import Image

from pipeline.images import to_data_url
from pipeline.synthesis.teachers.base import TeacherConfig, TeacherError, TeacherRequest
from tests.support.teacher_batches import BatchService

# Model ids GET /v1/models lists by default (the ones the reliability helpers configure).
TEST_MODELS = {"describe": "describer-test", "reason": "reasoner-test", "anchor": "anchorer-test"}
FAULTS = ("500", "502", "503", "429", "slow", "malformed", "truncated", "empty", "refused")
STAGE_HEADING = re.compile(r"^## Task: (\w+)[ \t]*$", re.MULTILINE)
DATA_URL = re.compile(r"^data:(image/[\w.+-]+);base64,(.*)$", re.DOTALL)


@dataclass
class ChatCall:
    """What a responder gets: the decoded request, the recognised record and its stage."""

    key: str  # hash of the request body (the duplicate-detection key)
    model: str
    stage: str | None
    messages: list[dict]  # as received (image parts are data URLs)
    images: list[bytes]  # decoded image bytes, in message order
    record: dict | None  # registered seed whose image matched, plus earlier stages' texts
    sampling: dict


@dataclass
class ImageSeen:
    mime: str
    width: int
    height: int
    sha256: str


@dataclass
class CallLog:
    key: str
    stage: str | None
    outcome: str  # "ok" or a fault name or "error:<status>"
    arrived_at: float = 0.0  # time.monotonic() when the request arrived
    images: list[ImageSeen] = field(default_factory=list)


@dataclass
class ChatReply:
    """A reply with a separate reasoning chain, as reasoning models' servers send it: the chain
    in ``message.<reasoning_field>`` (``reasoning_content``: DeepSeek's API; ``reasoning``: vLLM's
    reasoning parsers), the rest in ``message.content``."""

    content: str
    reasoning: str | None = None
    reasoning_field: str = "reasoning_content"


Responder = Callable[[ChatCall], "str | ChatReply | Awaitable[str | ChatReply]"]


class ResponderError(Exception):
    """Raised by a responder to answer with an HTTP error (``status``) instead of a completion."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


def body_key(body: dict) -> str:
    """The identity of a request: sha256 of its whole body (model, messages, sampling).

    Sampling is part of it so that two rollouts of one prompt (different seeds) are two requests.
    """
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def fixed_responder(text: str) -> Responder:
    """A responder that answers every request with ``text`` (benchmarks, unit tests)."""
    return lambda call: text


class ProgrammaticResponder:
    """Answers with :class:`pipeline.synthesis.teachers.programmatic.ProgrammaticTeacher` on the seed."""

    def __init__(self):
        from pipeline.synthesis.teachers.programmatic import (
            ProgrammaticTeacher,  # another helper's module
        )
        self.teacher = ProgrammaticTeacher(TeacherConfig())

    async def __call__(self, call: ChatCall) -> str:
        if call.record is None:
            raise ResponderError(400, "no registered record in the request (by image, or by question "
                                      "and description for a text-only prompt)")
        if call.stage is None:
            raise ResponderError(400, "no '## Task: <stage>' heading line in the prompt")
        request = TeacherRequest(key=call.key, stage=call.stage, messages=call.messages,
                                 images=call.images, sampling=call.sampling, record=call.record)
        [result] = await self.teacher.agenerate([request])
        if isinstance(result, TeacherError):
            raise ResponderError(422, str(result))
        return result.text


def records_to_json(records: Iterable[dict]) -> list[dict]:
    """Records with image bytes as base64 strings (for ``POST /admin/register``)."""
    out = []
    for record in records:
        images = [{**im, "bytes": base64.b64encode(im["bytes"]).decode()} for im in record["images"]]
        out.append({**record, "images": images})
    return out


class TeacherServer:
    """See the module docstring. All counters are safe to read from the test thread."""

    def __init__(self, responder: Responder | None = None, *, latency_s: float = 0.0,
                 fault_rates: dict[str, float] | None = None, seed: int = 0,
                 retry_after: str = "0", slow_s: float = 30.0, host: str = "127.0.0.1",
                 port: int = 0, register_max_pixels: Iterable[int | None] = (1_003_520,),
                 models: dict[str, int | None] | None = None):
        self._responder = responder
        self.latency_s, self.seed, self.retry_after, self.slow_s = latency_s, seed, retry_after, slow_s
        self.host, self.port = host, port
        # served model id -> max_model_len (None: not reported), as GET /v1/models lists them
        self.models = dict(models) if models is not None else {
            name: None for name in ("avar-test-teacher", *TEST_MODELS.values())}
        self.register_max_pixels = tuple(register_max_pixels)
        self._fault_rates: dict[str, float] = {}
        self.faults(fault_rates or {})
        self._script: deque[str] = deque()
        self._records: dict[str, dict] = {}  # image sha256 -> seed record
        self._by_question: dict[str, list[dict]] = {}  # question -> seed records (text-only prompts)
        self._history: dict[str, dict[str, str]] = {}  # record id -> stage -> text served
        self._lock = threading.Lock()
        self.total_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.success_counts: Counter[str] = Counter()
        self.arrivals: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.calls: list[CallLog] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self.batches = BatchService(self)  # /v1/files and /v1/batches (tests/support/teacher_batches.py)

    # -- configuration ---------------------------------------------------------------------

    def faults(self, rates: dict[str, float]) -> TeacherServer:
        """Per-request fault probabilities, e.g. ``{"500": 0.2, "429": 0.1}`` (sum <= 1)."""
        unknown = set(rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {FAULTS}")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities sum to {sum(rates.values())} > 1")
        self._fault_rates = dict(rates)
        return self

    def script(self, *outcomes: str) -> TeacherServer:
        """The next requests, in arrival order, get these outcomes (``"ok"`` = normal)."""
        for outcome in outcomes:
            if outcome != "ok" and outcome not in FAULTS:
                raise ValueError(f"unknown scripted outcome {outcome!r}; known: ok, {FAULTS}")
        with self._lock:
            self._script.extend(outcomes)
        return self

    def register(self, records: Iterable[dict]) -> TeacherServer:
        """Recognise these seed records by the sha256 of each image as sent (also resized)."""
        with self._lock:
            for record in records:
                if record.get("question"):
                    self._by_question.setdefault(record["question"], []).append(record)
                for image in record["images"]:
                    data = image["bytes"]
                    self._records[hashlib.sha256(data).hexdigest()] = record
                    for max_pixels in self.register_max_pixels:
                        sent = _decode_data_url(to_data_url(data, max_pixels))[1]
                        self._records[hashlib.sha256(sent).hexdigest()] = record
        return self

    # -- counters ----------------------------------------------------------------------------

    def duplicates(self) -> dict[str, int]:
        """Request keys answered successfully more than once (should be empty)."""
        with self._lock:
            return {k: n for k, n in self.success_counts.items() if n > 1}

    def stats(self) -> dict:
        with self._lock:
            return {"total_requests": self.total_requests, "max_in_flight": self.max_in_flight,
                    "successes": sum(self.success_counts.values()),
                    "outcomes": dict(self.outcomes),
                    "duplicates": {k: n for k, n in self.success_counts.items() if n > 1},
                    "success_counts": dict(self.success_counts)}

    def reset_counters(self) -> None:
        with self._lock:
            self.total_requests = self.max_in_flight = 0
            for counter in (self.success_counts, self.arrivals, self.outcomes):
                counter.clear()
            self.calls.clear()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TeacherServer:
        if self._responder is None:
            self._responder = ProgrammaticResponder()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve(sock))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name=f"teacher-server:{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("teacher server did not start within 30 s")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _serve(self, sock: socket.socket) -> None:
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/admin/register", self._admin_register)
        app.router.add_get("/admin/stats", self._admin_stats)
        self.batches.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, shutdown_timeout=1.0).start()

    async def _shutdown(self) -> None:
        self._closing.set()  # slow handlers stop waiting
        await self._runner.cleanup()

    # -- handlers ----------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "owned_by": "tests",
                 **({"max_model_len": limit} if limit is not None else {})}
                for name, limit in self.models.items()]
        return web.json_response({"object": "list", "data": data})

    async def _admin_register(self, request: web.Request) -> web.Response:
        records = (await request.json())["records"]
        for record in records:
            for image in record["images"]:
                image["bytes"] = base64.b64decode(image["bytes"])
        self.register(records)
        return web.json_response({"registered": len(records)})

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.total_requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, TypeError) as e:
            return _error(400, f"bad request body: {type(e).__name__}: {e}")
        status, payload, headers = await self.complete(body)
        if isinstance(payload, str):  # the "malformed" fault: a cut-off JSON body
            return web.Response(status=status, content_type="application/json", text=payload)
        return web.json_response(payload, status=status, headers=headers)

    async def complete(self, body: dict, batch: bool = False) -> tuple[int, dict | str, dict | None]:
        """One chat completion: ``(HTTP status, JSON body or cut-off text, headers)``.

        The chat endpoint and the batch lines (``batch=True``: no waiting on "slow", a
        "malformed" answer is a completion without choices, since a batch output line is JSON)
        share it, and with it the faults, the responder and the success counter.
        """
        try:
            messages, model = body["messages"], body["model"]
        except (KeyError, TypeError) as e:
            return _error_body(400, f"bad request body: {type(e).__name__}: {e}")
        arrived_at = time.monotonic()
        key = body_key(body)
        try:
            images, seen = _images_of(messages)
        except ValueError as e:
            return _error_body(400, str(e))
        stage = _stage_of(messages)
        outcome = self._draw_outcome(key)
        entry = CallLog(key=key, stage=stage, outcome=outcome, images=seen, arrived_at=arrived_at)
        with self._lock:
            self.calls.append(entry)
            self.outcomes[outcome] += 1
        if self.latency_s and not batch:
            await asyncio.sleep(self.latency_s)
        if outcome in ("500", "502", "503"):
            return _error_body(int(outcome), "injected server error")
        if outcome == "429":
            return _error_body(429, "injected rate limit", headers={"Retry-After": self.retry_after})
        if outcome == "slow":
            if not batch:
                try:
                    await asyncio.wait_for(self._closing.wait(), self.slow_s)
                except TimeoutError:
                    pass
            return _error_body(504, "injected slow response")
        if outcome == "malformed":
            if batch:
                return 200, {"id": f"chatcmpl-{key[:12]}", "object": "chat.completion",
                             "created": int(time.time()), "model": model, "choices": []}, None
            return 200, '{"id": "chatcmpl-broken", "object": "chat.comp', None
        record = self._record_for(images) if images else self._record_for_text(messages)
        sampling = {k: v for k, v in body.items() if k not in ("model", "messages")}
        call = ChatCall(key=key, model=model, stage=stage, messages=messages, images=images,
                        record=record, sampling=sampling)
        try:
            text = self._responder(call)
            if inspect.isawaitable(text):
                text = await text
        except ResponderError as e:
            entry.outcome = f"error:{e.status}"
            return _error_body(e.status, e.message)
        except Exception as e:  # noqa: BLE001 - a broken responder must show in the client's error
            entry.outcome = "error:500"
            return _error_body(500, f"responder failed: {type(e).__name__}: {e}")
        reply = text if isinstance(text, ChatReply) else ChatReply(text)
        text = reply.content
        finish = "stop"
        if outcome == "truncated":
            text, finish = text[: max(1, len(text) // 2)], "length"
        elif outcome == "empty":
            text = ""
        elif outcome == "refused":
            text, finish = "I can't help with that.", "content_filter"
        else:
            with self._lock:
                self.success_counts[key] += 1
                if record is not None and stage is not None:
                    self._history.setdefault(_record_id(record), {})[stage] = text
        prompt_tokens = sum(len(_text_of(m).split()) for m in messages) + 256 * len(images)
        message = {"role": "assistant", "content": text}
        completion_tokens = len(text.split())
        if reply.reasoning is not None:
            message[reply.reasoning_field] = reply.reasoning
            completion_tokens += len(reply.reasoning.split())
        return 200, {
            "id": f"chatcmpl-{key[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "finish_reason": finish, "message": message}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}, None

    def _draw_outcome(self, key: str) -> str:
        with self._lock:
            self.arrivals[key] += 1
            nth = self.arrivals[key]
            if self._script:
                return self._script.popleft()
        # keyed by (seed, request, n-th arrival): the same request meets the same faults in
        # any arrival order, so a fault mix is reproducible under concurrency
        rng = random.Random(f"{self.seed}:{key}:{nth}")
        draw, cumulative = rng.random(), 0.0
        for fault, rate in self._fault_rates.items():
            cumulative += rate
            if draw < cumulative:
                return fault
        return "ok"

    def _record_for(self, images: list[bytes]) -> dict | None:
        with self._lock:
            for data in images:
                record = self._records.get(hashlib.sha256(data).hexdigest())
                if record is not None:
                    earlier = self._history.get(_record_id(record), {})
                    stages = {**record.get("stages", {}),
                              **{s: {"text": t} for s, t in earlier.items()}}
                    return {**record, "stages": stages}
        return None


    def _record_for_text(self, messages: list[dict]) -> dict | None:
        """The record a text-only prompt is about: its question is in the prompt, and where
        several records share a question, so is the description served to this one."""
        text = "\n".join(_text_of(m) for m in messages)
        with self._lock:
            candidates = [r for q, rs in self._by_question.items() if q in text for r in rs]
            if len(candidates) > 1:
                candidates = [r for r in candidates if (self._history.get(_record_id(r), {}).get("describe")
                                                        or "\x00") in text]
            if len(candidates) != 1:
                return None
            record = candidates[0]
            earlier = self._history.get(_record_id(record), {})
            return {**record, "stages": {**record.get("stages", {}),
                                         **{s: {"text": t} for s, t in earlier.items()}}}


def _record_id(record: dict) -> str:
    """A registered record's identity: its ``id``, else the sha256 of its first image."""
    return record.get("id") or hashlib.sha256(record["images"][0]["bytes"]).hexdigest()


def _error_body(status: int, message: str, headers: dict | None = None) -> tuple[int, dict, dict | None]:
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    return status, {"error": {"message": message, "type": kind, "code": status}}, headers


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    status, body, headers = _error_body(status, message, headers)
    return web.json_response(body, status=status, headers=headers)


def _decode_data_url(url: str) -> tuple[str, bytes]:
    match = DATA_URL.match(url)
    if not match:
        raise ValueError(f"image_url is not a base64 data URL: {url[:40]!r}")
    return match.group(1), base64.b64decode(match.group(2), validate=True)


def _images_of(messages: list[dict]) -> tuple[list[bytes], list[ImageSeen]]:
    images, seen = [], []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") != "image_url":
                continue
            mime, data = _decode_data_url(part["image_url"]["url"])
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
            images.append(data)
            seen.append(ImageSeen(mime, width, height, hashlib.sha256(data).hexdigest()))
    return images, seen


def _text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content or [] if p.get("type") == "text")


def _stage_of(messages: list[dict]) -> str | None:
    for message in messages:
        match = STAGE_HEADING.search(_text_of(message))
        if match:
            return match.group(1)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible teacher server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    parser.add_argument("--fault", action="append", default=[], metavar="KIND=P",
                        help=f"fault probability, repeatable; kinds: {', '.join(FAULTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retry-after", default="0")
    parser.add_argument("--slow", type=float, default=30.0, help="seconds a 'slow' answer takes")
    parser.add_argument("--fixed-text", default=None,
                        help="answer every request with this text instead of the programmatic teacher")
    args = parser.parse_args(argv)
    rates = {kind: float(p) for kind, p in (f.split("=", 1) for f in args.fault)}
    responder = fixed_responder(args.fixed_text) if args.fixed_text is not None else None
    server = TeacherServer(responder, latency_s=args.latency, fault_rates=rates, seed=args.seed,
                           retry_after=args.retry_after, slow_s=args.slow, host=args.host,
                           port=args.port).start()
    print(f"listening on {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
