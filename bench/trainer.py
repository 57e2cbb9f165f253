"""One SFT training step: AGTO (lens) vs plain SFT vs the reference code's way.

One random-weight Qwen2.5-VL (8 layers, hidden 512, 8 query / 2 KV heads, vocabulary 4096), a
batch of 2 chat samples with a 448x448 image each (256 image tokens), cut to each length.
Every step is forward + backward + AdamW update in float32 on the CPU; methods:

- ``plain``:     LM loss on the response tokens, SDPA attention (the floor);
- ``AGTO``:      plain + ``0.15 * L_enh + 0.15 * L_sup`` from the attention lens observing the
  same forward pass (:mod:`pipeline.lens`, :func:`pipeline.lens.objectives.agto_terms`);
- ``reference``: the public reference code's way: an eager-attention model with
  ``output_attentions=True`` and the same AGTO terms reduced from the full ``[B, H, L, L]`` maps.

Each method runs in its own subprocess (so its peak memory is its own): one warm-up step, then
the median of ``--repeats`` steps. Peak memory is the largest RSS increase over the pre-step RSS,
polled every millisecond. Target: AGTO <= 1.3x plain. Prints a markdown table.

    python -m bench.trainer                       # about 4 minutes on 2 idle cores
    python -m bench.trainer --lengths 1024 2048 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("plain", "AGTO", "reference")
MODEL = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
         "intermediate_size": 1408, "max_position_embeddings": 8192}
IMAGE_SIDE = 448  # (448 / 28)^2 = 256 image tokens
BATCH = 2
ALPHA = BETA = 0.15
EPS = 1e-6


def build_model(folder: Path) -> Path:
    from pipeline.vlm import build_tiny_model

    return build_tiny_model(folder / "model", seed=0, max_pixels=IMAGE_SIDE * IMAGE_SIDE, **MODEL)


def make_batch(processor, length: int, batch: int = BATCH, image_side: int = IMAGE_SIDE,
               question: str = "Find the angle at A ({i}).", system: str | None = None):
    """``batch`` samples (optional system turn, a random ``image_side``-pixel image + ``question``
    formatted with the sample index ``i``, a long response), each cut to ``length`` tokens;
    labels cover the response only."""
    import torch
    from PIL import Image

    from pipeline.vlm import build_inputs
    from pipeline.vlm.spans import compute_spans

    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (image_side, image_side, 3), generator=gen,
                                            dtype=torch.uint8).numpy()) for _ in range(batch)]
    sentence = "Look back at the triangle: the angle at B is marked 40 degrees, so A is 50. "
    system_turn = [{"role": "system", "content": system}] if system else []
    conversations = [[*system_turn,
                      {"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": question.format(i=i)}]},
                      {"role": "assistant", "content": sentence * (length // 8)}] for i in range(batch)]
    inputs = build_inputs(processor, conversations, [[image] for image in images])
    if inputs["input_ids"].shape[1] < length:
        raise RuntimeError(f"samples have only {inputs['input_ids'].shape[1]} tokens, wanted {length}")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in inputs:
            inputs[key] = inputs[key][:, :length]
    spans = compute_spans(inputs["input_ids"], inputs["attention_mask"], processor)
    inputs["labels"] = inputs["input_ids"].masked_fill(~spans.response, -100)
    return inputs, spans


def reference_terms(attentions, spans):
    """AGTO terms from full attention maps, as the reference code computes its statistics."""
    import torch

    user = spans.user.float()[:, None, :, None]  # [B, 1, L, 1] query rows
    per_layer_enh, per_layer_sup = [], []
    for attention in attentions:  # [B, H, L, L]
        on_image = (attention * spans.image.float()[:, None, None, :]).sum(-1, keepdim=True)
        on_system = (attention * spans.system.float()[:, None, None, :]).sum(-1, keepdim=True)
        n_pairs_image = spans.user.sum(1) * spans.image.sum(1)  # [B]
        n_pairs_system = spans.user.sum(1) * spans.system.sum(1)
        mean_image = (on_image * user).sum(dim=(2, 3)) / n_pairs_image[:, None]  # [B, H]
        mean_system = (on_system * user).sum(dim=(2, 3)) / n_pairs_system[:, None]
        per_layer_enh.append(-torch.log(mean_image + EPS).mean(-1))
        per_layer_sup.append(torch.log(mean_system + EPS).mean(-1))
    return torch.stack(per_layer_enh).mean(0).mean(), torch.stack(per_layer_sup).mean(0).mean()


class PeakRSS:
    """Largest RSS increase during the block (polled in a thread)."""

    def __init__(self):
        import psutil

        self.process, self.peak = psutil.Process(), 0

    def __enter__(self):
        self.base, self.running = self.process.memory_info().rss, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss - self.base)


def run_case(model_dir: str, method: str, length: int, repeats: int, threads: int) -> dict:
    import torch

    from pipeline.lens import AttentionLens
    from pipeline.lens.objectives import agto_terms
    from pipeline.vlm import load_model_and_processor

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    impl = "eager" if method == "reference" else "sdpa"
    model, processor = load_model_and_processor(model_dir, dtype=torch.float32, attn_implementation=impl)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    inputs, spans = make_batch(processor, length)
    lens = AttentionLens(model)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if method == "plain":
            loss = model(**inputs).loss
        elif method == "AGTO":
            with lens.capture(spans.user, image_mask=spans.image, system_mask=spans.system) as cap:
                lm = model(**inputs).loss
            enh, sup = agto_terms(cap, eps=EPS, reduction="mean")
            loss = lm + ALPHA * enh + BETA * sup
        else:
            out = model(**inputs, output_attentions=True)
            enh, sup = reference_terms(out.attentions, spans)
            loss = out.loss + ALPHA * enh + BETA * sup
        loss.backward()
        optimizer.step()
        return float(loss)

    step()  # warm-up (also allocates the optimizer state)
    times, cpu_times, peaks = [], [], []
    for _ in range(repeats):
        with PeakRSS() as peak:
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        peaks.append(peak.peak)
    return {"time_s": statistics.median(times), "cpu_s": statistics.median(cpu_times), "peak_mib": max(peaks) / 2**20,
            "tokens": int(inputs["input_ids"].numel()), "n_image": int(spans.image.sum()),
            "n_user": int(spans.user.sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per case (1: steadier numbers on a shared machine)")
    parser.add_argument("--case", nargs=3, metavar=("MODEL_DIR", "METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        model_dir, method, length = args.case
        print(json.dumps(run_case(model_dir, method, int(length), args.repeats, args.threads)))
        return 0

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        for length in args.lengths:
            for method in METHODS:
                out = subprocess.run([sys.executable, "-m", "bench.trainer", "--repeats", str(args.repeats),
                                      "--threads", str(args.threads), "--case",
                                      str(model_dir), method, str(length)],
                                     cwd=REPO, capture_output=True, text=True, env={**os.environ}, check=False)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return out.returncode
                rows[length, method] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"  {length:>5} {method:<9} {rows[length, method]['time_s']:.3f}s", file=sys.stderr)

    first = rows[args.lengths[0], "plain"]
    print(f"\nOne SFT step (forward + backward + AdamW), batch {BATCH}: {MODEL['num_hidden_layers']} layers, "
          f"hidden {MODEL['hidden_size']}, {first['n_image'] // BATCH} image tokens per sample, float32, "
          f"CPU, {args.threads} torch thread(s); median of {args.repeats}. CPU time is the process's own "
          "(steadier than wall time when the machine is shared)\n")
    print("| tokens / sample | method | step wall (s) | step CPU (s) | x plain (CPU) | peak RSS increase (MiB) "
          "| x plain memory |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        plain = rows[length, "plain"]
        for method in METHODS:
            row = rows[length, method]
            print(f"| {length} | {method} | {row['time_s']:.2f} | {row['cpu_s']:.2f} | "
                  f"{row['cpu_s'] / plain['cpu_s']:.2f} | {row['peak_mib']:.0f} | "
                  f"{row['peak_mib'] / max(plain['peak_mib'], 1e-9):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
