"""The attention lens against eager ``output_attentions=True`` and a plain SDPA forward.

Random-weight Qwen2.5-VL models with the real models' head size 128 (8 layers, hidden 1024, 8
query / 2 KV heads) and, as a second row, head size 64 (hidden 512), a 448x448 image = 256 image
tokens, one chat sample cut to 512 / 2048 / 4096 tokens, no_grad, float32, CPU. Methods:

- ``sdpa``:   plain forward, no statistics (the floor);
- ``eager``:  ``output_attentions=True`` on an eager model + the image/system sums over U rows;
- ``lens U``: the lens, queries = the user question (model-level VAS, AGTO), sets I and S;
- ``lens R``: the lens, queries = the whole response (response VAS, VARS reward), sets I and S;
- ``lens all``: queries U and R, the budget's sets S, I, U, R at once (what the VAS stage takes).

Time: per length, one process with one torch thread runs the four methods interleaved
``--repeats`` times and keeps each one's fastest run, in CPU seconds of the process (robust to
other jobs on a shared machine) and in wall seconds. Memory: one process per
method and length, the largest RSS increase during one forward, polled every millisecond
(torch's CPU allocations are invisible to tracemalloc). Those processes run with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so every tensor block is its own mapping, returned to
the OS when freed, and RSS tracks live tensors; with glibc's default, moving threshold the same
forward measured 55-106 MiB from one process to the next, with it 66-69 MiB. Prints a markdown
table.

    python -m bench.vas                        # a few minutes on 2 idle cores
    python -m bench.vas --lengths 512 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("sdpa", "eager", "lens U", "lens R", "lens all")
MODELS = {128: {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
                "intermediate_size": 2816, "max_position_embeddings": 8192},
          64: {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
               "intermediate_size": 1408, "max_position_embeddings": 8192}}
IMAGE_SIDE = 448  # (448 / 28)^2 = 256 image tokens
WARM_UP_TOKENS = 384  # the image and a short answer
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # RSS = live tensors (module docstring)


def build_model(folder: Path, head_dim: int) -> Path:
    from pipeline.vlm import build_tiny_model

    return build_tiny_model(folder / f"model-{head_dim}", seed=0, max_pixels=IMAGE_SIDE * IMAGE_SIDE,
                            **MODELS[head_dim])


def make_inputs(processor, length: int):
    """One chat sample (system, image + question, long response) cut to exactly ``length``."""
    import torch
    from PIL import Image

    from pipeline.vlm import build_inputs
    from pipeline.vlm.spans import compute_spans

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), generator=gen, dtype=torch.uint8)
    sentence = "Look back at the triangle: the angle at B is marked 40 degrees, so A is 50. "
    response = sentence * (length // 8)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find the angle at A."}]},
                    {"role": "assistant", "content": response}]
    inputs = build_inputs(processor, [conversation], [[Image.fromarray(pixels.numpy())]])
    if inputs["input_ids"].shape[1] < length:
        raise RuntimeError(f"sample has only {inputs['input_ids'].shape[1]} tokens, wanted {length}")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in inputs:
            inputs[key] = inputs[key][:, :length]
    return inputs, compute_spans(inputs["input_ids"], inputs["attention_mask"], processor)


class PeakRSS:
    """Largest RSS increase during the block (polled in a thread)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0

    def __enter__(self):
        self.base = self.process.memory_info().rss
        self.running = True
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


def _forward_fn(models, processor, method: str, length: int):
    """A zero-argument callable running ``method`` once on the ``length``-token sample."""
    from pipeline.lens import AttentionLens
    from pipeline.lens.budget import budget_key_masks

    inputs, spans = make_inputs(processor, length)
    model = models["eager" if method == "eager" else "sdpa"]
    lens = AttentionLens(model)

    def forward():
        if method == "sdpa":
            return model(**inputs, logits_to_keep=1)
        if method == "eager":
            attn = model(**inputs, output_attentions=True, logits_to_keep=1).attentions
            rows = spans.user[0]
            return [((a[0][:, rows] * spans.image[0]).sum(-1), (a[0][:, rows] * spans.system[0]).sum(-1))
                    for a in attn]
        if method == "lens all":
            with lens.capture(spans.user | spans.response, key_masks=budget_key_masks(spans)) as cap:
                model(**inputs, logits_to_keep=1)
            return cap.masses
        query = spans.user if method == "lens U" else spans.response
        with lens.capture(query, spans.image, spans.system) as cap:
            model(**inputs, logits_to_keep=1)
        return cap.masses

    counts = {"n_image": int(spans.image.sum()), "n_user": int(spans.user.sum()),
              "n_response": int(spans.response.sum())}
    return forward, counts


def _load(model_dir: str, methods) -> tuple[dict, object]:
    import torch

    from pipeline.vlm import load_model_and_processor

    models, processor = {}, None
    for impl in {"eager" if m == "eager" else "sdpa" for m in methods}:
        models[impl], processor = load_model_and_processor(model_dir, dtype=torch.float32, attn_implementation=impl)
        models[impl].eval()
    return models, processor


def time_case(model_dir: str, length: int, repeats: int) -> dict:
    """Fastest run per method (CPU seconds of this process, and wall seconds), one torch thread,
    methods interleaved in one process so that background load hits all of them alike."""
    import torch

    torch.set_num_threads(1)
    models, processor = _load(model_dir, METHODS)
    runs = {m: _forward_fn(models, processor, m, length) for m in METHODS}
    warm = {m: _forward_fn(models, processor, m, WARM_UP_TOKENS)[0] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    with torch.no_grad():
        for method in METHODS:
            warm[method]()
        for _ in range(repeats):
            for method in METHODS:
                start, start_cpu = time.perf_counter(), time.process_time()
                runs[method][0]()
                cpu[method].append(time.process_time() - start_cpu)
                wall[method].append(time.perf_counter() - start)
    return {m: {"time_s": min(cpu[m]), "wall_s": min(wall[m]), **runs[m][1]} for m in METHODS}


def memory_case(model_dir: str, method: str, length: int) -> dict:
    """Peak RSS increase of one forward (this process runs only this method)."""
    import torch

    torch.set_num_threads(1)
    models, processor = _load(model_dir, [method])
    forward, _ = _forward_fn(models, processor, method, length)
    with torch.no_grad():
        _forward_fn(models, processor, method, WARM_UP_TOKENS)[0]()  # warm-up
        with PeakRSS() as peak:
            result = forward()
            del result
    return {"peak_mib": peak.peak / 2**20}


def _subprocess(*args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.vas", *args], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64], choices=sorted(MODELS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--time-case", nargs=2, metavar=("MODEL_DIR", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-case", nargs=3, metavar=("MODEL_DIR", "METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_case:
        print(json.dumps(time_case(args.time_case[0], int(args.time_case[1]), args.repeats)))
        return 0
    if args.memory_case:
        model_dir, method, length = args.memory_case
        print(json.dumps(memory_case(model_dir, method, int(length))))
        return 0

    started = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for head_dim in args.head_dims:
            model_dir = str(build_model(Path(tmp), head_dim))
            for length in args.lengths:
                timed = _subprocess("--repeats", str(args.repeats), "--time-case", model_dir, str(length))
                for method in METHODS:
                    row = {**timed[method], **_subprocess("--memory-case", model_dir, method, str(length), env=FIXED_MMAP)}
                    rows[head_dim, length, method] = row
                    print(f"  d={head_dim} {length:>5} {method:<8} {row['time_s']:.3f}s {row['peak_mib']:.0f} MiB",
                          file=sys.stderr)

    first = rows[args.head_dims[0], args.lengths[0], "sdpa"]
    print(f"\nLens vs eager vs plain SDPA: 8 layers, 8/2 heads, {first['n_image']} image tokens, float32, CPU, "
          f"1 torch thread, no_grad; CPU time = fastest of {args.repeats} interleaved runs; "
          f"bench took {time.perf_counter() - started:.0f} s\n")
    print("| head dim | tokens | method | queries | CPU time (s) | x SDPA | eager / this | wall (s) | "
          "peak RSS increase (MiB) | x SDPA |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for head_dim in args.head_dims:
        for length in args.lengths:
            sdpa, eager = rows[head_dim, length, "sdpa"], rows[head_dim, length, "eager"]
            for method in METHODS:
                row = rows[head_dim, length, method]
                n_query = {"lens U": row["n_user"], "lens R": row["n_response"], "eager": row["n_user"],
                           "lens all": row["n_user"] + row["n_response"]}.get(method)
                print(f"| {head_dim} | {length} | {method} | {n_query or '-'} | {row['time_s']:.3f} | "
                      f"{row['time_s'] / sdpa['time_s']:.2f} | {eager['time_s'] / row['time_s']:.1f} | "
                      f"{row['wall_s']:.3f} | {row['peak_mib']:.0f} | {row['peak_mib'] / sdpa['peak_mib']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
