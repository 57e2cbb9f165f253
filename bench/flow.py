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

    python -m bench.flow                                 # configs/demo.yaml
    python -m bench.flow --set seeds.n=200               # quicker
    python -m bench.flow --repeats 2                     # ABBA order, best per mode
    python -m bench.flow --reads                         # bytes read per stage, N x S grid
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

from flows import components
from flows.config import load_synth_config
from pipeline.plan import DEFAULT_PLAN


def outputs(root: Path) -> list[str]:
    return [f"run.store_dir={root / 'store'}", f"publish.out_dir={root / 'published'}",
            f"publish.cards_dir={root / 'cards'}", "run.progress=false"]


def run_plain(config_path: str, overrides: list[str]) -> tuple[float, int]:
    config = load_synth_config(config_path, overrides)
    started = time.perf_counter()
    funnel = components.run_local(config)
    return time.perf_counter() - started, funnel["steps"]["unique"]


class ReadCounter:
    """Bytes of parquet column chunks each stage reads (compressed, as stored on disk), counted
    by wrapping pyarrow's and polars' parquet readers, so the same count works for any version
    of the store."""

    def __init__(self):
        self.label = "-"
        self.bytes: dict[str, int] = {}

    @staticmethod
    def chunk_bytes(source, columns) -> int:
        import pyarrow.parquet as pq
        meta = pq.ParquetFile(source).metadata
        return sum(meta.row_group(g).column(c).total_compressed_size
                   for g in range(meta.num_row_groups) for c in range(meta.num_columns)
                   if columns is None or meta.row_group(g).column(c).path_in_schema.split(".")[0] in columns)

    def __enter__(self):
        import polars as pl
        import pyarrow.parquet as pq
        self.saved = pq.read_table, pl.read_parquet

        def counted(read):
            def wrapper(source, *args, columns=None, **kwargs):
                self.bytes[self.label] = self.bytes.get(self.label, 0) + self.chunk_bytes(source, columns)
                return read(source, *args, columns=columns, **kwargs)
            return wrapper
        pq.read_table, pl.read_parquet = counted(pq.read_table), counted(pl.read_parquet)
        return self

    def __exit__(self, *exc):
        import polars as pl
        import pyarrow.parquet as pq
        pq.read_table, pl.read_parquet = self.saved


def bytes_read(config_path: str, overrides: list[str], n: int, shards: int, root: Path) -> dict[str, int]:
    """Bytes read per stage by one plain run of ``n`` seeds over ``shards`` partitions."""
    config = load_synth_config(config_path, [*overrides, f"seeds.n={n}", f"run.n_shards={shards}",
                                             *outputs(root), "vas.progress=false"])
    with ReadCounter() as counter:
        counter.label = "seeds"
        components.run_seeds(config)
        for stage in DEFAULT_PLAN.of_scope("shard"):
            counter.label = stage.name
            for shard in range(shards):
                components.run_shard(stage.name, shard, config)
        counter.label = "filter"
        components.run_filter(config)
    components.STAGE_POOL.close()
    return counter.bytes


def reads_table(config_path: str, overrides: list[str], sizes: list[int], shard_counts: list[int]) -> None:
    runs = {}
    with tempfile.TemporaryDirectory(prefix="avar-bench-reads-") as tmp:
        for n in sizes:
            for shards in shard_counts:
                runs[(n, shards)] = bytes_read(config_path, overrides, n, shards, Path(tmp) / f"{n}-{shards}")
    stages = [s.name for s in DEFAULT_PLAN.stages]
    print("\nMB of parquet column chunks read, per stage (one run each)\n")
    print("| seeds N | shards S | " + " | ".join(stages) + " |")
    print("|---:|---:|" + "---:|" * len(stages))
    for (n, shards), got in runs.items():
        print(f"| {n} | {shards} | " + " | ".join(f"{got.get(s, 0) / 1e6:.2f}" for s in stages) + " |")


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
    parser.add_argument("--reads", action="store_true",
                        help="instead of timing: bytes read per stage for --sizes x --shards")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 800])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    if args.reads:
        reads_table(args.config, args.overrides, args.sizes, args.shards)
        return
    config = load_synth_config(args.config, args.overrides)
    n_seeds = config.seeds.n
    from pipeline.vlm import tiny_model_path
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
