"""Peak memory of a synthesis run as the dataset grows (the store streams shard by shard).

For each size N a fresh child process runs what the flow's tasks run (flows.components, no
Prefect): N procedural seeds -> describe/reason/anchor with the programmatic teacher -> verify
-> VAS -> filter -> publish, on configs/demo.yaml, into a temporary folder. After each phase the
child records its peak RSS so far (getrusage ru_maxrss) and its current RSS; the parent prints a
markdown table. Streaming holds when the peak does not grow with N.

VAS: ``--vas passthrough`` (default) swaps the reference-model forward for a stage that writes a
deterministic pseudo score per id, because the tiny model's CPU forward (~0.1-0.2 s per sample
on 2 cores) would make 10k samples take an hour while its memory is per batch, not per dataset
(``--vas tiny`` runs the real VAS stage).

    python -m bench.memory                          # N = 1000 and 10000
    python -m bench.memory --sizes 300 1500 --vas tiny
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PHASES = ("imports", "seeds", "describe", "reason", "anchor", "verify", "vas", "filter", "publish")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def child(n: int, root: Path, vas: str) -> dict:
    phases: dict[str, dict] = {}
    started = time.perf_counter()

    def mark(phase: str) -> None:
        phases[phase] = {"peak_mib": round(peak_mib(), 1), "rss_mib": round(current_mib(), 1),
                         "seconds": round(time.perf_counter() - started, 1)}

    from flows import components
    from flows.config import load_synth_config
    from pipeline.plan import DEFAULT_PLAN
    from tests.support.stages import PassthroughVAS
    config = load_synth_config(REPO / "configs" / "demo.yaml", [
        f"seeds.n={n}", f"run.store_dir={root / 'store'}", f"publish.out_dir={root / 'published'}",
        f"publish.cards_dir={root / 'cards'}", "run.progress=false", "vas.progress=false",
        "seeds.image_size=448"])
    plan = DEFAULT_PLAN.replacing("vas", PassthroughVAS) if vas == "passthrough" else DEFAULT_PLAN
    mark("imports")
    funnel = components.run_local(config, plan, after_stage=mark)
    store_bytes = sum(p.stat().st_size for p in (root / "store").rglob("*") if p.is_file())
    return {"n": n, "kept": funnel["steps"].get("unique"), "phases": phases,
            "store_mib": round(store_bytes / 2**20, 1)}


def run_size(n: int, vas: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"avar-bench-mem-{n}-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "bench.memory", "--child", str(n), "--root", tmp, "--vas", vas],
                              cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"size {n} failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--vas", choices=["passthrough", "tiny"], default="passthrough")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, Path(args.root), args.vas)))
        return
    results = []
    for n in args.sizes:
        print(f"running N={n} ...", file=sys.stderr, flush=True)
        results.append(run_size(n, args.vas))
    print(f"\nPeak RSS (MiB, ru_maxrss so far) after each phase; VAS: {args.vas}\n")
    print("| N seeds | kept | " + " | ".join(PHASES) + " | store on disk (MiB) | wall (s) |")
    print("|---" * (len(PHASES) + 4) + "|")
    for r in results:
        cells = [str(r["phases"][p]["peak_mib"]) for p in PHASES]
        print(f"| {r['n']} | {r['kept']} | " + " | ".join(cells)
              + f" | {r['store_mib']} | {r['phases']['publish']['seconds']} |")


if __name__ == "__main__":
    main()
