"""Publish memory stays flat as the dataset grows, and publish/re-publish throughput.

For each dataset size a work store of synthetic samples (one incompressible noise PNG each) is
built, then ``pipeline.publishing.publish.publish`` runs in a fresh subprocess over the store's stream;
the subprocess reports its peak RSS (``ru_maxrss``), and a second publish of the same data
measures the no-op path (digest match, nothing rewritten).

    python -m bench.publish                       # 300 and 1200 samples of ~270 kB images
    python -m bench.publish --sizes 200 400 --side 200
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys, time
from pipeline.publishing.publish import PublishConfig, publish
from pipeline.store import WorkStore
config = PublishConfig(dataset_name="bench", out_dir={out!r}, cards_dir={cards!r}, exports=[],
                       max_shard_bytes=50_000_000)
timings = []
for _ in range(2):
    started = time.perf_counter()
    result = publish(config, WorkStore({store!r}).stage("filter").iter_records(), progress=False)
    timings.append((time.perf_counter() - started, result.changed))
print(json.dumps({{"timings": timings, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "files": len(result.files)}}))
"""


def build_store(root: Path, n: int, side: int) -> int:
    from PIL import Image

    from pipeline.store import WorkStore
    from tests.support.samples import image, make_record

    rng = random.Random(0)
    stage = WorkStore(root).stage("filter")
    total, batch = 0, []
    for i in range(n):
        noise = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
        buf = io.BytesIO()
        noise.save(buf, format="PNG", compress_level=1)
        record = make_record(i, question=f"Bench problem {i}: what is shown?")
        record["images"] = [dict(image(buf.getvalue(), side), width=side, height=side)]
        total += len(buf.getvalue())
        batch.append(record)
        if len(batch) == 100:
            stage.write(batch)
            batch = []
    stage.write(batch)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1200])
    parser.add_argument("--side", type=int, default=300, help="noise image side in pixels")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            image_bytes = build_store(tmp / "store", n, args.side)
            code = CHILD.format(repo=str(REPO), out=str(tmp / "out"), cards=str(tmp / "cards"), store=str(tmp / "store"))
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            report = json.loads(done.stdout.strip().splitlines()[-1])
            (first, changed), (second, changed_again) = report["timings"]
            assert changed and not changed_again
            rows.append((n, image_bytes / 1e6, report["files"], first, n / first, second, report["peak_rss_mb"]))
    print("| samples | image MB | shards | publish s | samples/s | re-publish (no-op) s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for n, mb, files, first, rate, second, rss in rows:
        print(f"| {n} | {mb:.0f} | {files} | {first:.1f} | {rate:.0f} | {second:.1f} | {rss:.0f} |")
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs; one {args.side}x{args.side} noise PNG per sample, "
          "50 MB shards, no exports.")


if __name__ == "__main__":
    main()
