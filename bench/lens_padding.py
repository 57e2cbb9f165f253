"""How wide the lens' augmented SDPA call should be: the attention call alone, per padded width.

The lens appends ``n`` indicator columns to V and zero-pads q, k and V to one width ``w >= d + n``
(``pipeline.lens.augmented.COLUMN_MULTIPLE``). This times one causal
``F.scaled_dot_product_attention`` call (float32, CPU, 1 thread, 8 heads, batch 1) at the plain
head size ``d`` (the floor) and at ``d + n`` rounded up to multiples of 1, 8, 16 and 32, for
``n`` = 3 (image, system, total: U or R VAS) and 5 (the budget's S, I, U, R and total), and prints
each as a multiple of the plain call. Fastest of ``--repeats`` runs, widths interleaved.

    python -m bench.lens_padding [--lengths 2048 4096] [--head-dims 128 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

MULTIPLES = (1, 8, 16, 32)
HEADS = 8


def width(head_dim: int, n_sets: int, multiple: int) -> int:
    return -(-(head_dim + n_sets) // multiple) * multiple


def time_call(length: int, head_dim: int, w: int, repeats: int) -> float:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, head_dim) for _ in range(3))
    pad = (0, w - head_dim)
    q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    best = float("inf")
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head_dim**-0.5)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head_dim**-0.5)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| head dim | tokens | sets | plain ms | " + " | ".join(f"multiple of {m}" for m in MULTIPLES) + " |")
    print("|---:|---:|---:|---:|" + "---:|" * len(MULTIPLES))
    for head_dim in args.head_dims:
        for length in args.lengths:
            plain = time_call(length, head_dim, head_dim, args.repeats)
            for n_sets in (3, 5):
                cells = []
                for multiple in MULTIPLES:
                    w = width(head_dim, n_sets, multiple)
                    cells.append(f"{time_call(length, head_dim, w, args.repeats) / plain:.3f}x (w {w})")
                print(f"| {head_dim} | {length} | {n_sets} | {plain * 1e3:.0f} | " + " | ".join(cells) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
