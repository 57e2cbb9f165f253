"""Throughput of OpenAITeacher.agenerate against a bare AsyncOpenAI loop, same server, same load.

The claim: our retry/concurrency/usage layer costs at most 10 % of throughput (ratio >= 0.9).
The fake server (tests/support/teacher_server.py) runs in its own process with a fixed latency (200 ms by
default) so it does not share the client's interpreter. Both clients send the same requests (one
small PNG each, encoded to a data URL per request), with the same number in flight.

    python -m bench.teachers                        # 512 requests, 32 and 64 in flight
    python -m bench.teachers --requests 256 --concurrency 16 32 --repeats 1
    python -m bench.teachers --vllm-python .venv-vllm/bin/python --requests 128 --concurrency 8 16

With ``--vllm-python`` the server is a real vLLM (make vllm-setup) serving the tiny Qwen3 text
model of tests/support/tiny_lm.py, and the requests are text-only (as the reason and anchor
stages send them), each forced by a regex (structured outputs) into one short reason-format
reply, so every request costs about the same.

Prints a markdown table: requests/second for each client and the ratio (median of repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai
from PIL import Image, ImageDraw
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent

from pipeline.images import to_data_url
from pipeline.synthesis.teachers.base import TeacherConfig, TeacherRequest
from pipeline.synthesis.teachers.openai_backend import OpenAITeacher

ANSWER = "<think>The figure shows three bars; the tallest is 7.</think><answer>7</answer>"


def figure_png(size: int = 384) -> bytes:
    """A small diagram-like PNG, about the size of a procedural seed image."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for i, height in enumerate((120, 220, 170)):
        x = 60 + i * 100
        draw.rectangle([x, size - 40 - height, x + 60, size - 40], fill=(70 + 60 * i, 90, 160))
        draw.text((x + 20, size - 30), f"B{i}", fill="black")
    draw.line([40, size - 40, size - 20, size - 40], fill="black", width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# a fixed shape (vLLM structured outputs), so every request generates about as many tokens
FORMAT = r"<think>\n(Look back at the image: [a-z]{3,6}\. ){3}\n</think>\n<answer>[0-9]</answer>"


def make_text_requests(n: int) -> list[TeacherRequest]:
    return [TeacherRequest(
        key=f"bench-{i}", stage="reason", images=[], record={},
        sampling={"max_tokens": 96, "temperature": 0.0, "seed": i, "structured_outputs": {"regex": FORMAT}},
        messages=[{"role": "system", "content": "You are a careful solver."},
                  {"role": "user", "content": [{"type": "text", "text": f"## Task: reason\nProblem {i}: "
                                                "the triangle has angles 50 and 60; find the third."}]}])
        for i in range(n)]


def make_requests(n: int, image: bytes) -> list[TeacherRequest]:
    return [TeacherRequest(
        key=f"bench-{i}", stage="describe", images=[image], record={},
        sampling={"max_tokens": 256, "temperature": 0.0},
        messages=[{"role": "system", "content": "You are a careful visual analyst."},
                  {"role": "user", "content": [{"type": "image", "index": 0},
                                               {"type": "text", "text": f"## Task: describe\nProblem {i}."}]}])
        for i in range(n)]


def start_server(latency_s: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.teacher_server", "--port", "0", "--latency", str(latency_s),
         "--fixed-text", ANSWER], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"teacher server did not start: {line!r}")
    return proc, line.split()[-1]


NAMED = ("max_tokens", "temperature", "seed")  # the rest goes in extra_body, as the teacher sends it


async def raw_loop(base_url: str, requests: list[TeacherRequest], concurrency: int,
                   model: str = "bench", expected: str | None = ANSWER) -> float:
    """The baseline: what a hand-written client does, with nothing on top."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=120)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(request: TeacherRequest) -> str:
        async with semaphore:
            messages = request.messages
            if request.images:
                url = await asyncio.to_thread(to_data_url, request.images[0], 1_003_520)
                user = request.messages[1]
                messages = [request.messages[0], {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}, user["content"][1]]}]
            named = {k: v for k, v in request.sampling.items() if k in NAMED}
            extra = {k: v for k, v in request.sampling.items() if k not in NAMED} or None
            completion = await client.chat.completions.create(
                model=model, messages=messages, extra_body=extra, **named)
            return completion.choices[0].message.content

    started = time.perf_counter()
    texts = await asyncio.gather(*(one(r) for r in requests))
    elapsed = time.perf_counter() - started
    await client.close()
    assert all(t == expected for t in texts) if expected else all(texts)
    return len(requests) / elapsed


async def teacher_loop(base_url: str, requests: list[TeacherRequest], concurrency: int,
                       model: str = "bench", expected: str | None = ANSWER) -> float:
    teacher = OpenAITeacher(TeacherConfig(backend="openai", model=model, base_url=base_url,
                                          max_concurrency=concurrency, timeout_s=120))
    started = time.perf_counter()
    results = await teacher.agenerate(requests, on_result=lambda i, r: None)
    elapsed = time.perf_counter() - started
    await teacher.aclose()
    ok = [getattr(r, "text", None) for r in results]
    assert all(t == expected for t in ok) if expected else all(ok), teacher.stats
    return len(requests) / elapsed


@contextlib.contextmanager
def vllm_server(python: str):
    """The real vLLM OpenAI server on the tiny Qwen3 text model (flags as configs/ci_vllm.yaml)."""
    from pipeline.synthesis.vllm_server import ServeConfig, VLLMServer
    from tests.support.tiny_lm import SERVED_NAME, tiny_lm_path
    config = ServeConfig(python=python, model=str(tiny_lm_path()), env={"VLLM_CPU_KVCACHE_SPACE": "2"},
                         args=["--max-model-len", "2048", "--dtype", "float32", "--enforce-eager",
                               "--no-enable-chunked-prefill",
                               "--no-enable-prefix-caching"])  # else the second client hits the first one's cache
    with VLLMServer(config, SERVED_NAME, ROOT / "runs" / "bench-vllm.log") as server:
        yield server.base_url, SERVED_NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per request (s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is shown")
    parser.add_argument("--vllm-python", help="benchmark against a real vLLM server started from "
                                              "this interpreter (tiny Qwen3 text model)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.vllm_python:
            base_url, model = stack.enter_context(vllm_server(args.vllm_python))
            requests, expected, ideal_of = make_text_requests(args.requests), None, None
            server = "real vLLM (vllm-cpu 0.32, tiny Qwen3, text-only reason-format replies)"
        else:
            proc, base_url = start_server(args.latency)
            stack.callback(lambda: (proc.kill(), proc.wait()))
            model, expected = "bench", ANSWER
            requests = make_requests(args.requests, figure_png())
            ideal_of = lambda c: f"{c / args.latency:.0f}"
            server = f"fake server, latency {args.latency * 1000:.0f} ms"
        rows = measure(base_url, model, expected, requests, args, ideal_of)
    print(f"\nOpenAITeacher vs raw AsyncOpenAI, {server}, median of {args.repeats}, "
          f"{os.cpu_count()} CPUs\n")
    print("| in flight | requests | ideal req/s | raw AsyncOpenAI req/s | OpenAITeacher req/s | ratio |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def measure(base_url, model, expected, requests, args, ideal_of) -> list[str]:
    asyncio.run(raw_loop(base_url, requests[:32], 8, model, expected))  # warm-up: imports, connections
    cells = [(c, r) for c in args.concurrency for r in range(args.repeats)]
    measured: dict[tuple[int, str], list[float]] = {}
    for concurrency, _ in tqdm(cells, desc="bench teachers", unit="pair"):
        # alternate the two clients so drift on a shared machine hits both alike
        for name, loop in (("raw", raw_loop), ("teacher", teacher_loop)):
            rate = asyncio.run(loop(base_url, requests, concurrency, model, expected))
            measured.setdefault((concurrency, name), []).append(rate)
    rows = []
    for concurrency in args.concurrency:
        raw = statistics.median(measured[(concurrency, "raw")])
        ours = statistics.median(measured[(concurrency, "teacher")])
        ideal = ideal_of(concurrency) if ideal_of else "-"
        rows.append(f"| {concurrency} | {args.requests} | {ideal} | {raw:.1f} | {ours:.1f} | {ours / raw:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
