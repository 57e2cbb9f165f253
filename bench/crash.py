"""The long crash test: kill -9 the synthesis flow at >= 10 points over every stage, compare.

The config (default configs/demo.yaml) runs with its three teacher stages on the OpenAI backend
against the fault-injecting test server (tests/support/teacher_server.py, retryable faults: 5xx, 429,
malformed bodies) and one shared Prefect server. First an uninterrupted reference run; then the
same config is killed with SIGKILL at each kill point in turn and restarted, until a run
completes. Kill points, in pipeline order:

    seeds (first seed shard written), three points in the teacher stages (random numbers of
    committed requests; the server holds new requests and the kill comes when every answered
    request is committed), verify (first shard), VAS (first shard, then half of them), filter
    (first shard), publish (staging folder exists, then the first data file installed)

Checks: the published rows equal the reference rows; no store stage holds an id twice; the
server answered no request successfully twice. Prints a markdown table.

    python -m bench.crash                                  # demo config (960 seeds)
    python -m bench.crash --set seeds.n=200 --seed 3       # ~4 min on 2 busy cores (RELIABILITY.md)
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from tests.support.reliability import (
    RETRYABLE_FAULTS,
    STORE_STAGES,
    HoldingResponder,
    PrefectServer,
    committed_requests,
    flow_command,
    flow_env,
    kill_9,
    openai_overrides,
    output_overrides,
    published_rows,
    quiesce_teacher,
    seed_records,
    spawn_flow,
    stage_ids,
    wait_until,
)
from tests.support.teacher_server import TeacherServer

TIMEOUT = 1800


def shards(store: Path, stage: str) -> int:
    return len(list((store / stage).rglob("part-*.parquet")))


def kill_points(n: int, n_shards_vas: int, rng: random.Random) -> list[tuple[str, object]]:
    teacher = sorted(rng.sample(range(max(2, n // 10), 3 * n - max(2, n // 10)), 3))
    # predicates get (store, published folder, flow pid, shards per stage when the run started):
    # a kill point needs a shard written by this run; publish stages in .staging-<pid>
    return ([("seeds", lambda s, p, pid, b: shards(s, "seeds") > b["seeds"])]
            + [(f"teacher ({t} of {3 * n} requests committed)", t) for t in teacher]
            + [("verify", lambda s, p, pid, b: shards(s, "verify") > b["verify"]),
               ("vas (first shard)", lambda s, p, pid, b: shards(s, "vas") > b["vas"]),
               ("vas (half the shards)", lambda s, p, pid, b: shards(s, "vas") > max(b["vas"], n_shards_vas // 2)),
               ("filter", lambda s, p, pid, b: shards(s, "filter") > b["filter"]),
               ("publish (staging)", lambda s, p, pid, b: (p / f".staging-{pid}").exists()),
               ("publish (installing)", lambda s, p, pid, b: any((p / "data").glob("*.parquet")))])


def snapshot(store: Path) -> str:
    return ", ".join(f"{stage} {shards(store, stage)}" for stage in STORE_STAGES if (store / stage).exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seed", type=int, default=0, help="where the teacher-stage kills fall")
    args = parser.parse_args()
    config = Path(args.config)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="avar-bench-crash-") as tmp, \
            PrefectServer(Path(tmp) / "prefect") as prefect:
        tmp = Path(tmp)
        env = flow_env(tmp / "prefect_home", prefect.api_url)
        base = args.overrides + ["run.retry_delay_s=0"]
        seeds = seed_records(base, config)
        n = len(seeds)
        from flows.config import load_synth_config
        settings = load_synth_config(config, base)
        n_vas_shards = max(1, n // settings.run.shard_size)

        started = time.perf_counter()
        with TeacherServer(HoldingResponder(), fault_rates=RETRYABLE_FAULTS, seed=1) as server, \
                open(tmp / "reference.log", "w") as log:
            server.register(seeds)
            ref = subprocess.run(flow_command(base + output_overrides(tmp / "ref") + openai_overrides(server.base_url),
                                              config), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 timeout=TIMEOUT, check=False)
            assert ref.returncode == 0, (tmp / "reference.log").read_text()[-4000:]
            faults = {k: v for k, v in server.outcomes.items() if k != "ok"}
        reference_s = time.perf_counter() - started
        reference = published_rows(tmp / "ref" / "published")

        root = tmp / "crashed"
        store, published = root / "store", root / "published"
        responder = HoldingResponder()
        rows = []
        started = time.perf_counter()
        with TeacherServer(responder, fault_rates=RETRYABLE_FAULTS, seed=1) as server:
            server.register(seeds)
            overrides = base + output_overrides(root) + openai_overrides(server.base_url)
            cache = store / "requests.sqlite"
            for label, point in kill_points(n, n_vas_shards, rng):
                at_start = {stage: shards(store, stage) for stage in STORE_STAGES}
                child = spawn_flow(overrides, env, tmp / "crashed.log", config)
                t0 = time.perf_counter()
                try:
                    if isinstance(point, int):
                        wait_until(lambda p=point: committed_requests(cache) >= p, TIMEOUT, label, alive=child)
                    else:
                        wait_until(lambda p=point, pid=child.pid, b=at_start: p(store, published, pid, b), TIMEOUT, label, interval=0.005,
                                   alive=child)
                    # shards of different stages overlap: teacher requests may be in flight at
                    # any kill point; hold them so that the kill loses none that was answered
                    quiesce_teacher(server, responder, cache, child)
                    held = responder.held
                except AssertionError as err:
                    rows.append((label, f"missed: {err}", "", "", ""))
                    child.wait(TIMEOUT)
                    continue
                kill_9(child)
                responder.fail_held()
                rows.append((label, f"{time.perf_counter() - t0:.1f}", str(committed_requests(cache)),
                             str(held), snapshot(store)))
            with open(tmp / "crashed.log", "a") as log:
                final = subprocess.run(flow_command(overrides, config), cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, timeout=TIMEOUT, check=False)
            assert final.returncode == 0, (tmp / "crashed.log").read_text()[-4000:]
            duplicates = server.duplicates()
            successes = sum(server.success_counts.values())
        crashed_s = time.perf_counter() - started
        result = published_rows(published)
        same = result == reference
        twice = {stage: len(ids) - len(set(ids)) for stage in STORE_STAGES
                 for ids in [stage_ids(store, stage)]}

    killed = sum(1 for r in rows if not r[1].startswith("missed"))
    print(f"\nConfig {config.name} {' '.join(args.overrides)}: {n} seeds, {len(reference)} published; "
          f"fault mix (reference run) {faults}\n")
    print("| # | kill point | s after (re)start | requests committed | requests held at the kill "
          "| shards per stage at the kill |")
    print("|---|---|---|---|---|---|")
    for i, (label, secs, committed, held, snap) in enumerate(rows, 1):
        print(f"| {i} | {label} | {secs} | {committed} | {held} | {snap} |")
    print(f"\n| check | result |\n|---|---|\n| kills survived | {killed} of {len(rows)} |"
          f"\n| published rows identical to the uninterrupted run | {same} ({len(result)} rows) |"
          f"\n| ids written twice in a store stage | {sum(twice.values())} |"
          f"\n| successful requests sent twice | {len(duplicates)} (successes {successes}, expected {3 * n}) |"
          f"\n| wall: reference / killed+restarted | {reference_s:.0f} s / {crashed_s:.0f} s |")
    if not same or any(twice.values()) or duplicates or successes != 3 * n:
        sys.exit(1)


if __name__ == "__main__":
    main()
