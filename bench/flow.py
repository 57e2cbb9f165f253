"""End-to-end synthesis throughput, and the Prefect flow's overhead over a plain loop.

Same config, a fresh work store per run (no request-cache hits):
- plain: the pipeline called directly (seeds, each stage over each shard in order, filter,
  publish), in this process, no Prefect;
- flow-serial: ``python -m flows.synth`` with ``run.max_workers=1`` (one task at a time: the
  same order of work as the plain loop, so the difference is Prefect's overhead);
- flow: ``python -m flows.synth`` as configured (shard k of a stage overlaps shard k+1 of the
  stage before).
Flow runs are timed inside the flow function and as the whole command (imports and the
temporary Prefect server included).

    python bench/flow.py                                 # configs/demo.yaml
    python bench/flow.py --set seeds.n=200               # quicker
    python bench/flow.py --repeats 2                     # ABBA order, best per mode
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flows import components
from pipeline.config import load_synth_config


def outputs(root: Path) -> list[str]:
    return [f"run.store_dir={root / 'store'}", f"publish.out_dir={root / 'published'}",
            f"publish.cards_dir={root / 'cards'}", "run.progress=false"]


def run_plain(config_path: str, overrides: list[str]) -> tuple[float, int]:
    config = load_synth_config(config_path, overrides)
    started = time.perf_counter()
    seeds = components.run_seeds(config)
    for stage in components.SHARD_STAGES:
        for ids in seeds["shards"]:
            components.run_shard(stage, ids, config)
    funnel = components.run_filter(config)["funnel"]
    components.run_publish(config, funnel)
    components.STAGE_POOL.close()
    return time.perf_counter() - started, funnel["steps"]["unique"]


def run_flow(config_path: str, overrides: list[str], prefect_home: Path) -> tuple[float, float, int]:
    env = dict(os.environ, PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.synth", "--config", config_path]
    for item in overrides:
        cmd += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"flow failed:\n{proc.stderr[-4000:]}")
    store = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run.store_dir=")))
    summary = json.loads((store / "run_summary.json").read_text())
    return summary["seconds"], wall, summary["funnel"]["steps"]["unique"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (best is reported)")
    args = parser.parse_args()
    config = load_synth_config(args.config, args.overrides)
    n_seeds = config.seeds.n
    from pipeline.models import tiny_model_path
    tiny_model_path()  # built once, outside the timings
    # ABBA order (plain, flow, flow, plain, ...): a machine whose load drifts favours neither.
    # "flow-serial" (one task at a time) isolates Prefect's own overhead; "flow" adds the overlap
    # of stages across shards that mapping gives.
    modes = ("plain", "flow-serial", "flow")
    order = [modes, modes[::-1]] * args.repeats
    runs: dict[str, list] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="avar-bench-flow-") as tmp:
        tmp = Path(tmp)
        for i, sequence in enumerate(order[:args.repeats]):
            for mode in sequence:
                overrides = args.overrides + outputs(tmp / f"{mode}{i}")
                if mode == "plain":
                    runs[mode].append(run_plain(args.config, overrides))
                else:
                    extra = ["run.max_workers=1"] if mode == "flow-serial" else []
                    runs[mode].append(run_flow(args.config, overrides + extra, tmp / "prefect"))
    plain_s, plain_kept = min(runs["plain"])
    serial_s, serial_wall, serial_kept = min(runs["flow-serial"])
    flow_s, flow_wall, flow_kept = min(runs["flow"])
    rows = [("plain loop (no Prefect)", plain_s, plain_kept),
            ("flow, max_workers=1, inside the flow", serial_s, serial_kept),
            ("flow, max_workers=1, whole command", serial_wall, serial_kept),
            (f"flow, max_workers={config.run.max_workers}, inside the flow", flow_s, flow_kept),
            (f"flow, max_workers={config.run.max_workers}, whole command", flow_wall, flow_kept)]
    print(f"\nconfig `{args.config}` {' '.join(args.overrides)}: {n_seeds} seeds, "
          f"{config.run.n_shards} shards, runner {config.run.runner}, {os.cpu_count()} CPUs, "
          f"best of {args.repeats} per mode\n")
    print("| mode | seconds | samples kept | seeds/s | kept samples/s | vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, kept in rows:
        print(f"| {name} | {seconds:.1f} | {kept} | {n_seeds / seconds:.1f} | {kept / seconds:.1f} | "
              f"{seconds / plain_s:.2f}x |")


if __name__ == "__main__":
    main()
