"""Throughput of OpenAITeacher.agenerate against a bare AsyncOpenAI loop, same server, same load.

The claim: our retry/concurrency/usage layer costs at most 10 % of throughput (ratio >= 0.9).
The fake server (tests/support/teacher_server.py) runs in its own process with a fixed latency (200 ms by
default) so it does not share the client's interpreter. Both clients send the same requests (one
small PNG each, encoded to a data URL per request), with the same number in flight.

    python -m bench.teachers                        # 512 requests, 32 and 64 in flight
    python -m bench.teachers --requests 256 --concurrency 16 32 --repeats 1

Prints a markdown table: requests/second for each client and the ratio (median of repeats).
"""

from __future__ import annotations

import argparse
import asyncio
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


async def raw_loop(base_url: str, requests: list[TeacherRequest], concurrency: int) -> float:
    """The baseline: what a hand-written client does, with nothing on top."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=60)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(request: TeacherRequest) -> str:
        async with semaphore:
            url = await asyncio.to_thread(to_data_url, request.images[0], 1_003_520)
            user = request.messages[1]
            messages = [request.messages[0], {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, user["content"][1]]}]
            completion = await client.chat.completions.create(
                model="bench", messages=messages, **request.sampling)
            return completion.choices[0].message.content

    started = time.perf_counter()
    texts = await asyncio.gather(*(one(r) for r in requests))
    elapsed = time.perf_counter() - started
    await client.close()
    assert all(t == ANSWER for t in texts)
    return len(requests) / elapsed


async def teacher_loop(base_url: str, requests: list[TeacherRequest], concurrency: int) -> float:
    teacher = OpenAITeacher(TeacherConfig(backend="openai", model="bench", base_url=base_url,
                                          max_concurrency=concurrency, timeout_s=60))
    started = time.perf_counter()
    results = await teacher.agenerate(requests, on_result=lambda i, r: None)
    elapsed = time.perf_counter() - started
    await teacher.aclose()
    assert all(getattr(r, "text", None) == ANSWER for r in results), teacher.stats
    return len(requests) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per request (s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is shown")
    args = parser.parse_args()

    requests = make_requests(args.requests, figure_png())
    proc, base_url = start_server(args.latency)
    rows = []
    try:
        asyncio.run(raw_loop(base_url, requests[:32], 8))  # warm-up: imports, first connections
        cells = [(c, r) for c in args.concurrency for r in range(args.repeats)]
        measured: dict[tuple[int, str], list[float]] = {}
        for concurrency, _ in tqdm(cells, desc="bench teachers", unit="pair"):
            # alternate the two clients so drift on a shared machine hits both alike
            for name, loop in (("raw", raw_loop), ("teacher", teacher_loop)):
                rate = asyncio.run(loop(base_url, requests, concurrency))
                measured.setdefault((concurrency, name), []).append(rate)
        for concurrency in args.concurrency:
            raw = statistics.median(measured[(concurrency, "raw")])
            ours = statistics.median(measured[(concurrency, "teacher")])
            ideal = concurrency / args.latency
            rows.append(f"| {concurrency} | {args.requests} | {ideal:.0f} | {raw:.1f} | {ours:.1f} "
                        f"| {ours / raw:.2f}x |")
    finally:
        proc.kill()
        proc.wait()
    print(f"\nOpenAITeacher vs raw AsyncOpenAI, server latency {args.latency * 1000:.0f} ms, "
          f"median of {args.repeats}, {os.cpu_count()} CPUs\n")
    print("| in flight | requests | ideal req/s | raw AsyncOpenAI req/s | OpenAITeacher req/s | ratio |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
