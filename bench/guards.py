"""The effect of the two guards (off by default) on the tiny model: AGTO SFT with and without
``sup_floor`` on the demo data, first and last logged step of VAS, its ratio-of-means companion
and the attention budget of the user queries.

    make demo && python -m bench.guards [--steps 30] [--data outputs/avar-demo-procedural]

Prints a markdown table (the numbers in BENCHMARKS.md "Guards").
"""

from __future__ import annotations

import argparse
import tempfile

from trainer import sft
from trainer.configs import AGTOConfig, parse_config

KEYS = ("vas", "vas_ratio_of_means", "budget/image", "budget/system", "budget/user", "budget/rest")


def run(data: str, steps: int, floor: float | None, out: str) -> list[dict]:
    args = ["--config", "configs/sft_tiny.yaml", "--dataset", data, "--max_steps", str(steps),
            "--max_train_samples", str(2 * steps), "--output_dir", out]
    if floor is not None:
        args += ["--sup_floor", str(floor)]
    trainer = sft.train(parse_config(AGTOConfig, args))
    return [e for e in trainer.state.log_history if "vas" in e]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default="outputs/avar-demo-procedural")
    parser.add_argument("--floor", type=float, default=0.01)
    args = parser.parse_args()
    rows = []
    for label, floor in (("paper (no floor)", None), (f"sup_floor={args.floor}", args.floor)):
        with tempfile.TemporaryDirectory() as out:
            logs = run(args.data, args.steps, floor, out)
        first, last = logs[0], logs[-1]
        rows.append(f"| {label} | " + " | ".join(f"{first[k]:.3g} -> {last[k]:.3g}" for k in KEYS) + " |")
    print(f"\nAGTO SFT, tiny Qwen2.5-VL, {args.steps} steps on {args.data} (first -> last step)\n")
    print("| run | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
