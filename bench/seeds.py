"""Procedural seed throughput, programmatic teacher throughput, and work-store write/read rates.

Generates ``--n`` problems (families round-robin, difficulties 1-5) on one core, timing each
family; runs the programmatic teacher's three stages over them; writes them to a fresh
:class:`pipeline.store.WorkStore` in ``--shard``-row shards and streams them back; finally
streams n/5 and n rows through the local-parquet seed loader in fresh processes, reporting peak
RSS after the first 1,000 rows and at the end (equal = memory does not grow with the dataset).

    python -m bench.seeds                 # 10,000 problems, 448 px, 256-row shards
    python -m bench.seeds --n 2000 --size 384
Prints a markdown table (wall time and CPU time: on a shared machine the CPU column is the
one that says what the code costs).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent

from pipeline.seeds import SeedsConfig, iter_seeds
from pipeline.store import WorkStore
from pipeline.synthesis.teachers.programmatic import write


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


LOADER_CHILD = """
import json, resource, sys, time
import datasets  # imported before timing: the one-off import is not the loader's cost
from pipeline.seeds import SeedsConfig, iter_seeds
wall, cpu = time.perf_counter(), time.process_time()
config = SeedsConfig(kind="local", path={path!r}, n=None)
n, warm = 0, None
for r in iter_seeds(config):
    n += isinstance(r, dict)
    if n == {warm_rows}:  # after warm-up (first row groups, arrow pools): later growth = a leak
        warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps([n, time.perf_counter() - wall, time.process_time() - cpu, warm or rss, rss]))
"""
WARM_ROWS = 1000


def loader_run(records: list[dict], rows: int) -> tuple[int, float, float, float, float]:
    """Stream ``rows`` seeds back through the local-parquet loader in a fresh process; its peak
    RSS should not grow with ``rows`` (the loader streams row groups)."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("images", pa.list_(image)), ("problem", pa.string()), ("answer", pa.string())]
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seeds.parquet"
        with pq.ParquetWriter(path, schema) as out:
            for start in range(0, rows, 256):
                chunk = [records[i % len(records)] for i in range(start, min(rows, start + 256))]
                columns = {
                    "images": [[{"bytes": r["images"][0]["bytes"], "path": None}] for r in chunk],
                    "problem": [f"{r['question']} #{start + k}" for k, r in enumerate(chunk)],
                    "answer": [r["gold_answer"] for r in chunk],
                }
                out.write_table(pa.table(columns, schema=schema))
        code = LOADER_CHILD.format(repo=str(REPO), path=str(path), warm_rows=WARM_ROWS)
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
    n, wall, cpu, warm, rss = json.loads(done.stdout.strip().splitlines()[-1])
    assert n == rows, (n, rows)
    return rows, wall, cpu, warm, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="problems to generate")
    parser.add_argument("--seed", type=int, default=0, help="master seed")
    parser.add_argument("--size", type=int, default=448, help="canvas side in pixels")
    parser.add_argument("--shard", type=int, default=256, help="rows per work-store shard")
    args = parser.parse_args()

    config = SeedsConfig(n=args.n, seed=args.seed, image_size=args.size)
    per_family: dict[str, list[float]] = defaultdict(
        lambda: [0, 0.0, 0.0, 0]
    )  # n, wall, cpu, bytes
    records = []
    stream = iter(iter_seeds(config))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in tqdm(range(args.n), desc="generate", unit="problem"):
        w, c = time.perf_counter(), time.process_time()
        rec = next(stream)
        stats = per_family[rec["scene"]["family"]]
        stats[0] += 1
        stats[1] += time.perf_counter() - w
        stats[2] += time.process_time() - c
        stats[3] += len(rec["images"][0]["bytes"])
        records.append(rec)
    gen_wall, gen_cpu = time.perf_counter() - wall0, time.process_time() - cpu0

    def teach():
        return sum(
            1 for r in records for stage in ("describe", "reason", "anchor") if write(stage, r)
        )

    n_texts, teach_wall, teach_cpu = timed(teach)

    with tempfile.TemporaryDirectory() as tmp:
        store = WorkStore(tmp).stage("seeds")

        def write_all():
            for i in range(0, len(records), args.shard):
                store.write(records[i : i + args.shard])
            return len(store.shards())

        n_shards, write_wall, write_cpu = timed(write_all)
        n_read, read_wall, read_cpu = timed(lambda: sum(1 for _ in store.iter_records()))
        disk = sum(p.stat().st_size for p in Path(tmp).rglob("*.parquet"))
    assert n_read == len(records)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loader_rows = [
        loader_run(records, rows) for rows in sorted({max(WARM_ROWS, args.n // 5), args.n})
    ]

    print(f"\n### Seeds bench: {args.n} problems, {args.size} px, seed {args.seed}\n")
    print("| what | items | wall s | items/s (wall) | CPU s | items/s (CPU) | notes |")
    print("|---|---|---|---|---|---|---|")
    for family, (n, wall, cpu, size) in sorted(per_family.items()):
        print(
            f"| generate {family} | {n} | {wall:.2f} | {n / wall:,.0f} | {cpu:.2f} | {n / cpu:,.0f} | "
            f"mean PNG {size / n / 1024:.1f} KiB |"
        )
    print(
        f"| generate all | {args.n} | {gen_wall:.2f} | {args.n / gen_wall:,.0f} | {gen_cpu:.2f} | "
        f"{args.n / gen_cpu:,.0f} | one core |"
    )
    print(
        f"| programmatic teacher (3 stages) | {n_texts} texts | {teach_wall:.2f} | {n_texts / teach_wall:,.0f} | "
        f"{teach_cpu:.2f} | {n_texts / teach_cpu:,.0f} | describe + reason + anchor |"
    )
    print(
        f"| work store write | {args.n} rows | {write_wall:.2f} | {args.n / write_wall:,.0f} | {write_cpu:.2f} | "
        f"{args.n / write_cpu:,.0f} | {n_shards} shards, {disk / 2**20:.1f} MiB zstd parquet |"
    )
    print(
        f"| work store read | {n_read} rows | {read_wall:.2f} | {n_read / read_wall:,.0f} | {read_cpu:.2f} | "
        f"{n_read / read_cpu:,.0f} | streamed shard by shard |"
    )
    for rows, wall, cpu, warm, rss in loader_rows:
        print(
            f"| loader, local parquet | {rows} rows | {wall:.2f} | {rows / wall:,.0f} | {cpu:.2f} | "
            f"{rows / cpu:,.0f} | fresh process; peak RSS {warm:.0f} MiB after {WARM_ROWS} rows, "
            f"{rss:.0f} MiB at the end |"
        )
    print(
        f"\npeak RSS {peak_mb:.0f} MiB (all {args.n} records are held in memory for the store step)"
    )


if __name__ == "__main__":
    main()
