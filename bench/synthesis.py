"""Claims: the pipeline's own work per sample is small next to a teacher call.

Times, on this machine, (1) the three teacher stages with the programmatic teacher over
procedural seeds (prompt rendering, cache look-up and commit, validation, anchors), (2) the
verify stage / ``answers_match`` (also the RL ``r_acc``), (3) the deduplicator (exact + MinHash
LSH) on synthetic responses, incremental and rebuilt. Prints markdown tables.

    python -m bench.synthesis [--n 200] [--dedup-n 5000]
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from pathlib import Path

from pipeline.filtering.dedup import Deduplicator
from pipeline.plan import DEFAULT_PLAN
from pipeline.seeds.config import SeedsConfig
from pipeline.seeds.procedural import iter_procedural
from pipeline.synthesis.cache import RequestCache
from pipeline.verify import VerifyStage, answers_match

PAIRS = [("0.5", "1/2", "number"), ("40°", "40", "number"), ("5 cm^2", "5", "number"),
         ("1+x", "x+1", "expression"), ("(B)", "B", "choice"), ("Paris", "paris", "text")]


def bench_stages(n: int) -> None:
    records = list(iter_procedural(SeedsConfig(n=n, image_size=320)))
    print(f"\n### Teacher stages, programmatic teacher, {n} procedural seeds\n")
    print("| stage | cache | ms / sample |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        cache = RequestCache(Path(tmp) / "requests.sqlite")
        for label in ("cold", "warm"):
            out = records
            for name in ("describe", "reason", "anchor"):
                with DEFAULT_PLAN.get(name)(cache=cache, progress=False) as stage:
                    start = time.perf_counter()
                    out = stage.run(out)
                    ms = (time.perf_counter() - start) * 1000 / n
                print(f"| {name} | {label} | {ms:.2f} |")
            start = time.perf_counter()
            VerifyStage().run(out)
            print(f"| verify | {label} | {(time.perf_counter() - start) * 1000 / n:.2f} |")


def bench_answers(repeats: int) -> None:
    print("\n### answers_match (main thread, math_verify timeouts on)\n")
    print("| predicted | gold | type | ms / call |\n|---|---|---|---|")
    for predicted, gold, kind in PAIRS:
        answers_match(predicted, gold, kind, ["30", "40", "50"] if kind == "choice" else None)
        start = time.perf_counter()
        for _ in range(repeats):
            answers_match(predicted, gold, kind, ["30", "40", "50"] if kind == "choice" else None)
        print(f"| {predicted} | {gold} | {kind} | {(time.perf_counter() - start) * 1000 / repeats:.2f} |")


def bench_dedup(n: int) -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    records = []
    for i in range(n):
        words = [rng.choice(vocab) for _ in range(200)]
        if i % 10 == 9:  # every tenth record: a near copy of an earlier one
            words = records[rng.randrange(len(records))]["response"].split()
            words[rng.randrange(200)] = "changed"
        records.append({"id": f"{i:032x}", "question": "Q", "response": " ".join(words), "images": []})
    dedup = Deduplicator(threshold=0.8)
    start = time.perf_counter()
    dupes = sum(dedup.check_and_add(r) is not None for r in records)
    incremental = time.perf_counter() - start
    kept = [r for r in records if r["id"] in dedup]
    start = time.perf_counter()
    Deduplicator.from_records(kept, threshold=0.8)
    rebuild = time.perf_counter() - start
    print(f"\n### Deduplicator, {n} responses of 200 words, threshold 0.8\n")
    print("| operation | records / s | duplicates found |\n|---|---|---|")
    print(f"| check_and_add | {n / incremental:.0f} | {dupes} |")
    print(f"| rebuild from kept | {len(kept) / rebuild:.0f} | - |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="procedural seeds for the stage timing")
    parser.add_argument("--dedup-n", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {platform.processor() or platform.machine()}")
    bench_stages(args.n)
    bench_answers(args.repeats)
    bench_dedup(args.dedup_n)


if __name__ == "__main__":
    main()
