"""Batch teachers: vLLM's offline batch engine against the managed online server, and what one
demo-sized run costs online and in batch mode.

``--engine`` (needs ``.venv-vllm``, make vllm-setup): the same text-only reason-format requests
(tests/support/tiny_lm.py's tiny Qwen3 model, a regex forcing the reply's shape, temperature 0)
go once through the online path (the managed ``VLLMServer`` + ``OpenAITeacher`` at a given
concurrency) and once through the batch path (``BatchRunner`` on ``vllm run-batch``, the
project's code end to end). Each engine loads the model before it serves: the table shows the
wall time with that start, and the serving time alone (online: after ``/v1/models`` answers;
offline: the N-request run minus a 1-request run of the same engine). Throughput is requests
and completion tokens per second of serving time, and of wall time.

``--cost``: ``configs/demo.yaml`` (800 seeds) with its three teachers on the OpenAI backend against
the test server (programmatic answers; the server counts tokens as words + 256 per image), run
through the flow's shard functions once online and once in ``mode: batch``; the run reports'
token counts priced at a named price list.

    python -m bench.batch --engine --vllm-python .venv-vllm/bin/python --requests 1536 --concurrency 16 64
    python -m bench.batch --cost [--set seeds.n=200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from bench.teachers import make_text_requests
from pipeline.synthesis.batch.config import BatchConfig
from pipeline.synthesis.batch.runner import BatchRunner
from pipeline.synthesis.cache import RequestCache
from pipeline.synthesis.teachers.base import TeacherConfig, TeacherResponse
from pipeline.synthesis.teachers.openai_backend import OpenAITeacher
from pipeline.synthesis.vllm_server import ServeConfig, VLLMServer

# OpenAI's list prices for GPT-4.1 (USD per million tokens; the OpenAI pricing page as
# summarised by deploybase.ai and tokenmath.io in 2026): Batch API at half of each.
PRICE_LIST = {"name": "OpenAI GPT-4.1 (standard $2.00 in / $8.00 out per Mtok; Batch API $1.00 / $4.00)",
              "input": 2.0, "output": 8.0}
SERVE_ARGS = ["--max-model-len", "2048", "--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill"]


def serve_config(python: str) -> ServeConfig:
    from tests.support.tiny_lm import tiny_lm_path
    return ServeConfig(python=python, model=str(tiny_lm_path()), args=SERVE_ARGS,
                       env={"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"})


def online(python: str, requests, concurrency: int, log: Path) -> dict:
    from tests.support.tiny_lm import SERVED_NAME
    started = time.perf_counter()
    with VLLMServer(serve_config(python), SERVED_NAME, log) as server:
        ready = time.perf_counter()
        teacher = OpenAITeacher(TeacherConfig(backend="openai", model=SERVED_NAME, base_url=server.base_url,
                                              max_concurrency=concurrency, timeout_s=600))

        async def run():
            try:
                return await teacher.agenerate(requests)
            finally:
                await teacher.aclose()
        results = asyncio.run(run())
        done = time.perf_counter()
    return _row(results, done - started, done - ready)


def offline(python: str, requests, work: Path) -> tuple[list, float]:
    from tests.support.tiny_lm import SERVED_NAME
    config = TeacherConfig(backend="openai", model=SERVED_NAME, mode="batch", serve=serve_config(python),
                           batch=BatchConfig(poll_initial_s=0.2, poll_max_s=0.5, recover_scan=0))
    results: dict = {}
    runner = BatchRunner(OpenAITeacher(config), RequestCache(work / "requests.sqlite"), "reason", work / "batches")
    started = time.perf_counter()
    runner.collect(requests, lambda key, result, collected: results.__setitem__(key, result))
    wall = time.perf_counter() - started
    runner.close()
    return [results[r.key] for r in requests], wall


def _row(results: list, wall: float, serving: float) -> dict:
    ok = [r for r in results if isinstance(r, TeacherResponse)]
    assert len(ok) == len(results), f"{len(results) - len(ok)} requests failed"
    completion = sum(r.completion_tokens for r in ok)
    return {"requests": len(ok), "prompt_tokens": sum(r.prompt_tokens for r in ok), "completion_tokens": completion,
            "wall_s": wall, "serving_s": serving}


def engine(args) -> None:
    requests = make_text_requests(args.requests)
    with tempfile.TemporaryDirectory(prefix="avar-bench-batch-") as tmp:
        tmp = Path(tmp)
        rows = {}
        _, wall_one = offline(args.vllm_python, make_text_requests(1), tmp / "one")
        results, wall = offline(args.vllm_python, requests, tmp / "all")
        rows["offline batch engine (vllm run-batch via BatchRunner)"] = _row(results, wall, wall - wall_one)
        for concurrency in args.concurrency:
            rows[f"managed online server (OpenAITeacher, {concurrency} in flight)"] = online(
                args.vllm_python, requests, concurrency, tmp / f"server-{concurrency}.log")
    print(f"\n{args.requests} text-only requests, tiny Qwen3 on vllm-cpu 0.32, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; offline 1-request run {wall_one:.1f} s\n")
    print("| path | requests | completion tokens | wall s (with start) | serving s | req/s (serving) | "
          "tok/s (serving) | req/s (wall) | tok/s (wall) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['requests']} | {r['completion_tokens']:,} | {r['wall_s']:.1f} | {r['serving_s']:.1f} | "
              f"{r['requests'] / r['serving_s']:.1f} | {r['completion_tokens'] / r['serving_s']:.0f} | "
              f"{r['requests'] / r['wall_s']:.2f} | {r['completion_tokens'] / r['wall_s']:.1f} |")


def cost(args) -> None:
    from flows import components
    from flows.config import load_synth_config
    from pipeline.plan import DEFAULT_PLAN
    from pipeline.synthesis.projection import project_costs
    from pipeline.synthesis.usage import token_cost_usd
    from tests.support.reliability import TEACHER_STAGES, openai_overrides, seed_records
    from tests.support.stages import PassthroughVAS
    from tests.support.teacher_server import ProgrammaticResponder, TeacherServer

    class Responder(ProgrammaticResponder):
        """The programmatic teacher; each description names its figure, so the server tells the
        text-only reason and anchor prompts of two seeds with the same question apart."""

        async def __call__(self, call):
            text = await super().__call__(call)
            return f"{text}\n(Figure {call.record['id'][:8]}.)" if call.stage == "describe" else text

    config_path = ROOT / "configs" / "demo.yaml"
    plan = DEFAULT_PLAN.replacing("vas", PassthroughVAS)  # VAS changes no teacher token
    seeds = seed_records(args.overrides, config_path)
    rows = {}
    with TeacherServer(Responder()) as server, tempfile.TemporaryDirectory(prefix="avar-bench-cost-") as tmp:
        server.register(seeds)
        server.batches.behaviour.steps_per_read = 4
        for mode in ("online", "batch"):
            settings = [*args.overrides, *openai_overrides(server.base_url), f"run.store_dir={tmp}/{mode}",
                        f"publish.out_dir={tmp}/{mode}-out", f"publish.cards_dir={tmp}/{mode}-cards",
                        "run.progress=false"]
            for stage in TEACHER_STAGES:
                settings += [f"stages.{stage}.teacher.mode={mode}",
                             f"stages.{stage}.teacher.batch.poll_initial_s=0.05",
                             f"stages.{stage}.teacher.price_input_per_mtok={PRICE_LIST['input']}",
                             f"stages.{stage}.teacher.price_output_per_mtok={PRICE_LIST['output']}"]
            config = load_synth_config(config_path, settings)
            projected = project_costs(config)[2]
            started = time.perf_counter()
            components.run_seeds(config, plan)
            usage = {}
            for stage in TEACHER_STAGES:
                for shard in range(config.run.n_shards):
                    report = components.run_shard(stage, shard, config, plan)
                    for key, value in report["usage"].items():
                        usage.setdefault(stage, {}).setdefault(key, 0)
                        usage[stage][key] += value
            components.STAGE_POOL.close()
            rows[mode] = (usage, time.perf_counter() - started, projected)
        batches = len(server.batches.batches)
    print(f"\n{len(seeds)} seeds of configs/demo.yaml, teachers on the test server; prices: {PRICE_LIST['name']}; "
          f"{batches} batches in batch mode\n")
    print("| mode | stage | requests | prompt tokens | completion tokens | cost USD (as reported) | "
          "same tokens at the standard price |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode, (usage, seconds, _) in rows.items():
        for stage, u in usage.items():
            list_price = token_cost_usd(u["prompt_tokens"], u["completion_tokens"], PRICE_LIST["input"],
                                        PRICE_LIST["output"])
            print(f"| {mode} | {stage} | {u['requests']:,} | {u['prompt_tokens']:,} | {u['completion_tokens']:,} | "
                  f"{u['cost_usd']:.4f} | {list_price:.4f} |")
        total = sum(u["cost_usd"] for u in usage.values())
        print(f"| {mode} | **total** ({seconds:.0f} s) | {sum(u['requests'] for u in usage.values()):,} | "
              f"{sum(u['prompt_tokens'] for u in usage.values()):,} | "
              f"{sum(u['completion_tokens'] for u in usage.values()):,} | **{total:.4f}** | |")
    projected = rows["batch"][2]
    print(f"\n`--check` projected at most ${sum(r['usd'] for r in projected):.2f} in batch mode "
          f"(${sum(r['online_usd'] for r in projected):.2f} online) for the same config: "
          + ", ".join(f"{r['stage']} <= {r['prompt_tokens']:,} + {r['completion_tokens']:,} tokens"
                      for r in projected))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", action="store_true", help="offline batch engine vs online server")
    parser.add_argument("--cost", action="store_true", help="a demo-sized run's cost online vs batch")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--requests", type=int, default=1536)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if not (args.engine or args.cost):  # `make bench`: both, the engine part where vLLM is installed
        args.cost = True
        args.engine = Path(args.vllm_python).exists()
        if not args.engine:
            print(f"engine comparison skipped: {args.vllm_python} does not exist (make vllm-setup)")
    if args.cost:
        cost(args)
    if args.engine:
        engine(args)


if __name__ == "__main__":
    main()
