"""GPU rows of BENCHMARKS.md: the attention lens and AGTO on CUDA, tiny and real-shaped, per family.

Random weights throughout (nothing is downloaded), one CUDA GPU:

    python -m bench.gpu --out gpu.json             # Qwen2.5-VL-7B shape, about 3 minutes on one H100/H200
    python -m bench.gpu --family qwen3_vl --out gpu-qwen3.json      # Qwen3-VL-8B shape, ~100 s on an H200
    python -m bench.gpu --family gemma3 --out gpu-gemma3.json       # Gemma-3-4B shape
    python -m bench.gpu --shape small --device cpu # a smoke run of the same code on a laptop

It needs torch and transformers, not an install of this project: from a copy of the checkout,
``PYTHONPATH=. python -m bench.gpu ...`` runs on a GPU machine's own environment (the
2026-12-04 rows ran so, with transformers 5.25.0 and huggingface_hub 2.4.0 carried as wheels).

``--family`` picks the tiny model of the exactness checks and the architecture of the shaped
model (``--shape full``: the real model's config.json sizes; ``7b`` is kept as the Qwen2.5-VL name).

1. **Exactness on CUDA** (``bench/_gpu_exactness.py``): on the tiny test model (batch of 3
   with left padding, two images in one sample), lens masses against eager
   ``output_attentions=True`` in float32 and bfloat16, and the parameter gradients of an
   AGTO-like loss through the lens against autograd through the eager maps; at the real shape
   (``shape_exactness``: the random-weight shaped model, one sample of ``--exact-length``
   tokens, queries U and R), the lens' own error in float32 and bfloat16 apart from the
   bfloat16 forward's drift.
2. **VAS forward** at 7B shape (bf16, ``no_grad``, batch 1, one 896x896 image = 1,024 image
   tokens): plain SDPA forward (no statistics), eager ``output_attentions=True`` plus the
   image/system sums, the lens with queries U (model-level VAS) and R (response VAS, the VARS
   reward); per length, median milliseconds and peak GPU memory above the weights.
3. **One training step** at 7B shape (bf16, forward + backward on every parameter; no optimizer
   update, since AdamW state for 8.3B parameters plus the reference's maps would not fit one
   GPU): plain LM loss vs AGTO (lens) vs the reference code's way (eager maps).

Out of memory is reported as such in a row, never as a crash of the run. ``--profile`` adds a
table of the top CUDA kernels of one lens-R forward at the longest VAS length.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._gpu_exactness import shape_exactness, spans_to, tiny_exactness, to_device

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Each family's real config.json sizes (text and vision tower): Qwen/Qwen2.5-VL-7B-Instruct,
# Qwen/Qwen3-VL-8B-Instruct, google/gemma-3-4b-it; token ids stay the tiny tokenizer's, which only
# changes which embedding rows are read. "small" runs the same code anywhere.
SHAPES = {
    "qwen2_5_vl": {
        "full": ({"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                  "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                  "max_position_embeddings": 128000, "rms_norm_eps": 1e-6},
                 {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                  "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112}),
        "small": ({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
                  {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                   "out_hidden_size": 256, "fullatt_block_indexes": [1], "window_size": 112})},
    "qwen3_vl": {
        "full": ({"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                  "max_position_embeddings": 262144, "rms_norm_eps": 1e-6},
                 {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                  "out_hidden_size": 4096, "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}),
        "small": ({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192, "max_position_embeddings": 32768},
                  {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 256,
                   "deepstack_visual_indexes": [0, 1]})},
    "gemma3": {
        "full": ({"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208,
                  "sliding_window": 1024, "max_position_embeddings": 131072, "query_pre_attn_scalar": 256},
                 {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16}),
        "small": ({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192, "sliding_window": 512},
                  {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2})},
}
SHAPES["qwen2_5_vl"]["7b"] = SHAPES["qwen2_5_vl"]["full"]
TINY_OF = {"qwen2_5_vl": "tiny", "qwen3_vl": "tiny-qwen3-vl", "gemma3": "tiny-gemma3"}
GEMMA_IMAGE = {"image_size": 896, "patch_size": 14, "mm_tokens_per_image": 256}  # 64 x 64 patches pooled 4x4
IMAGE_SIDE = 896  # Qwen2.5-VL: (896 / 28)^2 = 1,024 image tokens; Qwen3-VL: (896 / 32)^2 = 784; Gemma 3: 256


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak_mib(device, base):
    import torch

    return (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")


# ---------------------------------------------------------------- 2./3. the 7B-shaped model


def build_shaped_model(family: str, shape: str, device, dtype):
    """A random-weight model of ``family`` and ``shape``, built directly on ``device`` in
    ``dtype``, and the matching tiny model's processor (same special tokens, an image processor
    for ``IMAGE_SIDE``-pixel images)."""
    import torch
    from transformers import AutoConfig

    from pipeline.vlm import adapter_for, build_tiny_model, load_processor
    from pipeline.vlm.tiny import mrope_parameters

    folder = Path(tempfile.mkdtemp(prefix="avar-gpu-bench-")) / "tiny"
    if family == "gemma3":
        build_tiny_model(folder, seed=0, model_type="gemma3", vision=GEMMA_IMAGE)
    else:
        build_tiny_model(folder, seed=0, model_type=family, max_pixels=IMAGE_SIDE * IMAGE_SIDE)
    text, vision = SHAPES[family][shape]
    config = AutoConfig.from_pretrained(folder)
    adapter = adapter_for(config)
    config = config.to_dict()
    config["text_config"].update(text)
    for derived in ("layer_types", "max_window_layers"):  # follow num_hidden_layers
        config["text_config"].pop(derived, None)
    if family == "qwen2_5_vl":
        config["text_config"]["rope_parameters"] = mrope_parameters(text["hidden_size"], text["num_attention_heads"])
    elif family == "qwen3_vl":
        half = text["head_dim"] // 2
        config["text_config"]["rope_parameters"]["mrope_section"] = [half - 2 * (half * 5 // 16), half * 5 // 16,
                                                                     half * 5 // 16]
    config["vision_config"].update(vision)
    config = type(AutoConfig.from_pretrained(folder))(**config)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = adapter.model_cls()._from_config(config, dtype=dtype, attn_implementation="sdpa")
    _sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {family} {shape} model: {n_params / 1e9:.2f}B parameters in {time.perf_counter() - start:.1f} s",
          flush=True)
    return model.eval(), load_processor(folder), n_params


def _bench_trainer():
    """``bench/trainer.py`` as a module (the batch builder and the reference AGTO terms)."""
    spec = importlib.util.spec_from_file_location("bench_trainer", REPO / "bench" / "trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(processor, length: int, device):
    """One sample (system turn, a 896x896 image + question, long response) on ``device``."""
    inputs, spans = _bench_trainer().make_batch(processor, length, batch=1, image_side=IMAGE_SIDE,
                                                question="Find the angle at A.",
                                                system="You are a careful visual reasoner.")
    return to_device(inputs, device), spans_to(spans, device)


def _timed(fn, device, repeats: int) -> tuple[float, float]:
    """(median ms, peak MiB above what was allocated before) over ``repeats`` runs after a warm-up."""
    import torch

    try:
        fn()
        base = _peak_reset(device)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times), _peak_mib(device, base)
    except torch.OutOfMemoryError:
        _peak_reset(device)
        return float("nan"), float("inf")


def vas_forward(model, processor, device, lengths, repeats) -> list[dict]:
    from pipeline.lens import AttentionLens

    lens = AttentionLens(model)
    rows = [row for length in lengths for row in _vas_at(model, lens, processor, device, length, repeats)]
    model.set_attn_implementation("sdpa")
    return rows


def _vas_at(model, lens, processor, device, length, repeats) -> list[dict]:
    import torch

    inputs, spans = make_inputs(processor, length, device)
    inputs.pop("labels")
    rows_u = spans["user"]

    def sdpa():
        model(**inputs, logits_to_keep=1)

    def eager():
        attn = model(**inputs, output_attentions=True, logits_to_keep=1).attentions
        return [((a[0][:, rows_u[0]].float() * spans["image"][0]).sum(-1),
                 (a[0][:, rows_u[0]].float() * spans["system"][0]).sum(-1)) for a in attn]

    def lens_on(query, budget=False):
        sets = ({k: spans[k] for k in ("system", "image", "user", "response")} if budget
                else {"image": spans["image"], "system": spans["system"]})
        def run():
            with lens.capture(query, key_masks=sets) as cap:
                model(**inputs, logits_to_keep=1)
            return cap.masses
        return run

    rows = []
    with torch.no_grad():
        for method, fn, impl in (("sdpa", sdpa, "sdpa"), ("lens U", lens_on(spans["user"]), "sdpa"),
                                 ("lens R", lens_on(spans["response"]), "sdpa"),
                                 ("lens U+R+budget", lens_on(spans["user"] | spans["response"], True), "sdpa"),
                                 ("eager", eager, "eager")):
            model.set_attn_implementation(impl)
            ms, mib = _timed(fn, device, repeats)
            rows.append({"length": length, "method": method, "ms": ms, "peak_mib": mib,
                         "n_image": int(spans["image"].sum()), "n_user": int(spans["user"].sum()),
                         "n_response": int(spans["response"].sum())})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def profile_lens(model, processor, device, length: int, rows: int = 15) -> list[str]:
    """torch.profiler's table (top ``rows`` by device time) of one lens-R forward after a warm-up."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.lens import AttentionLens

    lens = AttentionLens(model)
    inputs, spans = make_inputs(processor, length, device)
    inputs.pop("labels")

    def run():
        with lens.capture(spans["response"], spans["image"], spans["system"]) as cap:
            model(**inputs, logits_to_keep=1)
        return cap.masses

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        run()
        _sync(device)
        with profile(activities=activities) as prof:
            run()
            _sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60).splitlines()


def train_step(model, processor, device, lengths, repeats) -> list[dict]:
    from pipeline.lens import AttentionLens

    bench_trainer = _bench_trainer()
    lens = AttentionLens(model)
    model.train()
    rows = [row for length in lengths
            for row in _train_at(model, lens, bench_trainer, processor, device, length, repeats)]
    model.eval()
    return rows


def _train_at(model, lens, bench_trainer, processor, device, length, repeats) -> list[dict]:
    from pipeline.lens.objectives import agto_terms

    alpha = beta = bench_trainer.ALPHA
    inputs, spans = make_inputs(processor, length, device)
    span_obj = type("Spans", (), spans)

    def plain():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    def agto():
        model.zero_grad(set_to_none=True)
        with lens.capture(spans["user"], image_mask=spans["image"], system_mask=spans["system"]) as cap:
            lm = model(**inputs).loss
        enh, sup = agto_terms(cap, eps=bench_trainer.EPS, reduction="mean")
        (lm + alpha * enh + beta * sup).backward()

    def reference():
        model.zero_grad(set_to_none=True)
        out = model(**inputs, output_attentions=True)
        enh, sup = bench_trainer.reference_terms(out.attentions, span_obj)
        (out.loss + alpha * enh + beta * sup).backward()

    rows = []
    for method, fn, impl in (("plain", plain, "sdpa"), ("AGTO", agto, "sdpa"), ("reference", reference, "eager")):
        model.set_attn_implementation(impl)
        ms, mib = _timed(fn, device, repeats)
        rows.append({"length": length, "method": method, "ms": ms, "peak_mib": mib})
        print(json.dumps(rows[-1]), flush=True)
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation("sdpa")
    return rows


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--family", choices=sorted(SHAPES), default="qwen2_5_vl")
    parser.add_argument("--shape", choices=["full", "small", "7b"], default="full")
    parser.add_argument("--vas-lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--train-lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exact-length", type=int, default=2048,
                        help="tokens of the sample of the exactness check at the real shape")
    parser.add_argument("--skip", nargs="*", default=[], choices=["exactness", "shape_exactness", "vas", "train"])
    parser.add_argument("--profile", action="store_true",
                        help="top CUDA kernels of one lens-R forward at the longest VAS length")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():  # `make bench` on a CPU machine
        print("bench.gpu: no CUDA device here, nothing measured "
              "(`python -m bench.gpu --shape small --device cpu` runs the same code as a smoke test)")
        return 0
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "family": args.family, "shape": args.shape}
    import transformers
    report["transformers"] = transformers.__version__

    def save():
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))

    if "exactness" not in args.skip:
        report["exactness"] = tiny_exactness(device, TINY_OF[args.family])
        print(json.dumps(report["exactness"]), flush=True)
        save()
    if {"shape_exactness", "vas", "train"} <= set(args.skip):
        return 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shape == "7b" and args.family != "qwen2_5_vl":
        parser.error("--shape 7b names the Qwen2.5-VL shape; use --shape full")
    at_shape = "shape_exactness" not in args.skip
    model, processor, n_params = build_shaped_model(args.family, args.shape, device,
                                                    torch.float32 if at_shape else dtype)
    report["parameters"] = n_params
    if at_shape:
        inputs, spans = make_inputs(processor, args.exact_length, device)
        inputs.pop("labels")
        report["shape_exactness"] = shape_exactness(model, inputs, spans)
        del inputs, spans
        _peak_reset(device)
        print(json.dumps(report["shape_exactness"]), flush=True)
        save()
    model.to(dtype)
    report["weights_mib"] = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None
    if "vas" not in args.skip:
        report["vas_forward"] = vas_forward(model, processor, device, args.vas_lengths, args.repeats)
        save()
    if args.profile:
        report["profile_lens_r"] = profile_lens(model, processor, device, max(args.vas_lengths))
        print("\n".join(report["profile_lens_r"]), flush=True)
        save()
    if "train" not in args.skip:
        model.requires_grad_(True)
        report["train_step"] = train_step(model, processor, device, args.train_lengths, args.repeats)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
