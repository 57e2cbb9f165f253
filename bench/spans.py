"""Claim: computing spans is a negligible per-step cost (vectorised, no Python loop over tokens).

Times :func:`pipeline.vlm.spans.compute_spans` on padded chat batches of the tiny model's template
(one image, a long response) and prints a markdown table. Compare with one training step of
the model you train: on CPU a 7B step takes seconds, the spans milliseconds.

    python -m bench.spans [--repeats 10]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from PIL import Image

from pipeline.vlm import build_inputs, load_processor, tiny_model_path
from pipeline.vlm.spans import SpecialTokens, compute_spans


def _batch(processor, batch_size: int, response_words: int):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), np.uint8))
    conversations = [[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is x?"}]},
        {"role": "assistant", "content": "Check the image again. " * (response_words * (i + 1)
                                                                        // batch_size // 4)},
    ] for i in range(batch_size)]  # different lengths: real padding
    return build_inputs(processor, conversations, [[image]] * batch_size,
                        max_pixels=448 * 448, padding_side="left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    processor = load_processor(tiny_model_path())
    special = SpecialTokens.from_tokenizer(processor)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    print("\n| batch | length | tokens | ms / call | tokens / ms |\n|---|---|---|---|---|")
    for batch_size, words in ((1, 2000), (8, 2000), (8, 8000), (32, 8000)):
        batch = _batch(processor, batch_size, words)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        compute_spans(ids, mask, special)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            compute_spans(ids, mask, special)
        ms = (time.perf_counter() - start) / args.repeats * 1000
        print(f"| {batch_size} | {ids.shape[1]} | {ids.numel()} | {ms:.2f} | {ids.numel() / ms:.0f} |")


if __name__ == "__main__":
    main()
