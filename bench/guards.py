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


def run(data: str, steps: int, floor: float | None, out: str):
    args = ["--config", "configs/sft_tiny.yaml", "--dataset", data, "--max_steps", str(steps),
            "--max_train_samples", str(2 * steps), "--output_dir", out]
    if floor is not None:
        args += ["--sup_floor", str(floor)]
    trainer = sft.train(parse_config(AGTOConfig, args))
    return [e for e in trainer.state.log_history if "vas" in e], trainer.model


def visual_rewards(model, processor) -> tuple[float, float]:
    """Mean VARS r_visual of the tests' three chat samples (response queries), in the paper's
    ratio form and the bounded image-share form."""
    import torch

    from pipeline.lens import AttentionLens
    from pipeline.lens.objectives import visual_reward
    from tests.support.lens import chat_batch

    inputs, spans = chat_batch(processor)
    model.eval()
    with torch.no_grad(), AttentionLens(model).capture(spans.response, spans.image, spans.system) as cap:
        model(**inputs)
    return float(visual_reward(cap).mean()), float(visual_reward(cap, form="image_share").mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default="outputs/avar-demo-procedural")
    parser.add_argument("--floor", type=float, default=0.01)
    args = parser.parse_args()
    from pipeline.vlm import load_model_and_processor
    base, processor = load_model_and_processor("tiny")
    before = visual_rewards(base, processor)
    rows, rewards = [], []
    for label, floor in (("paper (no floor)", None), (f"sup_floor={args.floor}", args.floor)):
        with tempfile.TemporaryDirectory() as out:
            logs, model = run(args.data, args.steps, floor, out)
        first, last = logs[0], logs[-1]
        rows.append(f"| {label} | " + " | ".join(f"{first[k]:.3g} -> {last[k]:.3g}" for k in KEYS) + " |")
        after = visual_rewards(model, processor)
        rewards.append(f"| {label} | {before[0]:.3g} -> {after[0]:.3g} | {before[1]:.3g} -> {after[1]:.3g} |")
    print(f"\nAGTO SFT, tiny Qwen2.5-VL, {args.steps} steps on {args.data} (first -> last step)\n")
    print("| run | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    print("\n".join(rows))
    print("\nVARS r_visual (ungated) of the AGTO-trained policy on 3 chat samples, base -> trained\n")
    print("| run | r_visual, paper ratio | r_visual, image_share (bounded) |\n|---|---|---|")
    print("\n".join(rewards))


if __name__ == "__main__":
    main()
