"""GPU rows of BENCHMARKS.md: the attention lens and AGTO on CUDA, tiny and real-shaped, per family.

Random weights throughout (nothing is downloaded), one CUDA GPU:

    python -m bench.gpu --out gpu.json             # Qwen2.5-VL-7B shape, about 3 minutes on one H100/H200
    python -m bench.gpu --family qwen3_vl --out gpu-qwen3.json      # Qwen3-VL-8B shape
    python -m bench.gpu --family gemma3 --out gpu-gemma3.json       # Gemma-3-4B shape
    python -m bench.gpu --shape small --device cpu # a smoke run of the same code on a laptop

``--family`` picks the tiny model of the exactness checks and the architecture of the shaped
model (``--shape full``: the real model's config.json sizes; ``7b`` is kept as the Qwen2.5-VL name).

1. **Exactness on CUDA** (the tiny test model, batch of 3 with left padding, two images in one
   sample): lens masses against eager ``output_attentions=True`` in float32 (max relative error,
   whole-row path, the one CUDA runs), in bfloat16 under ``no_grad`` against float32 eager
   (max absolute error), and the parameter gradients of an AGTO-like loss through the lens
   against autograd through the eager maps (max relative error over all parameters).
2. **VAS forward** at 7B shape (bf16, ``no_grad``, batch 1, one 896x896 image = 1,024 image
   tokens): plain SDPA forward (no statistics), eager ``output_attentions=True`` plus the
   image/system sums, the lens with queries U (model-level VAS) and R (response VAS, the VARS
   reward); per length, median milliseconds and peak GPU memory above the weights.
3. **One training step** at 7B shape (bf16, forward + backward on every parameter; no optimizer
   update, since AdamW state for 8.3B parameters plus the reference's maps would not fit one
   GPU): plain LM loss vs AGTO (lens) vs the reference code's way (eager maps).

Out of memory is reported as such in a row, never as a crash of the run.
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


def _to(inputs, device, dtype=None):
    return {k: (v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device))
            for k, v in inputs.items()}


def _spans_to(spans, device):
    return {name: getattr(spans, name).to(device) for name in ("system", "image", "user", "response")}


def _rel(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


# ---------------------------------------------------------------- 1. exactness on the device


def exactness(device, family: str = "qwen2_5_vl") -> dict:
    import warnings

    import torch

    from pipeline.lens import AttentionLens
    from pipeline.lens import modules as attention  # where the lens looks sdpa_with_lse up
    from pipeline.vlm import load_model_and_processor, resolve_model_name
    from tests.support.lens import SAMPLES, chat_batch

    path = resolve_model_name(TINY_OF[family])
    model, processor = load_model_and_processor(path, dtype=torch.float32, attn_implementation="sdpa")
    eager, _ = load_model_and_processor(path, dtype=torch.float32, attn_implementation="eager")
    model, eager = model.to(device).eval(), eager.to(device).eval()
    kernels: list[str] = []
    with_lse = attention.sdpa_with_lse

    def spy(module, query, key, value, mask, scale):  # which kernel gave the log-sum-exp
        half = query.dtype != torch.float32 and query.shape[-1] <= 256
        kernels.append("cpu flash" if query.device.type == "cpu" else "flash" if mask is None and half else "efficient")
        return with_lse(module, query, key, value, mask, scale)

    attention.sdpa_with_lse = spy
    out: dict = {}

    def case(name, samples, dtype, kernel_lse):
        cpu_inputs, cpu_spans = chat_batch(processor, "left", samples=samples)
        inputs, spans = _to(cpu_inputs, device), _spans_to(cpu_spans, device)
        query, image, system = spans["response"], spans["image"], spans["system"]
        attn = torch.stack(list(eager(**inputs, output_attentions=True).attentions))
        refs = {"image": (attn * image[None, :, None, None, :]).sum(-1) * query[None, :, None, :],
                "system": (attn * system[None, :, None, None, :]).sum(-1) * query[None, :, None, :]}
        kernels.clear()
        model.to(dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with AttentionLens(model, kernel_lse=kernel_lse).capture(query, image, system) as cap:
                model(**_to(cpu_inputs, device, dtype))
        model.to(torch.float32)
        out[name] = {"padded": bool((inputs["attention_mask"] == 0).any()),
                     "kernels": sorted(set(kernels)) or ["whole rows"],
                     "fallback_warnings": len(caught),
                     **{f"{key}_rel_err": _rel(cap.dense(key), ref) for key, ref in refs.items()},
                     **{f"{key}_abs_err": float((cap.dense(key) - ref).abs().max()) for key, ref in refs.items()}}

    try:
        with torch.no_grad():
            case("float32 padded, whole rows", SAMPLES, torch.float32, False)
            case("float32 padded, kernel lse", SAMPLES, torch.float32, True)
            case("bfloat16 padded, kernel lse", SAMPLES, torch.bfloat16, True)
            case("bfloat16 one sample, kernel lse", SAMPLES[2:], torch.bfloat16, True)
    finally:
        attention.sdpa_with_lse = with_lse

    cpu_inputs, cpu_spans = chat_batch(processor, "left")
    inputs, spans = _to(cpu_inputs, device), _spans_to(cpu_spans, device)
    query, image, system = spans["response"], spans["image"], spans["system"]

    def eager_maps():
        attn = torch.stack(list(eager(**inputs, output_attentions=True).attentions))
        return ((attn * image[None, :, None, None, :]).sum(-1) * query[None, :, None, :],
                (attn * system[None, :, None, None, :]).sum(-1) * query[None, :, None, :])

    def loss(img, sys_):
        valid = query[None, :, None, :].expand_as(img)
        return -(img[valid] + 1e-6).log().mean() + (sys_[valid] + 1e-6).log().mean()

    eager.zero_grad()
    loss(*eager_maps()).backward()
    model.zero_grad()
    with AttentionLens(model).capture(query, image, system) as cap:
        model(**inputs)
    loss(cap.dense("image"), cap.dense("system")).backward()
    expected = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    out["gradient_params"] = len(got)
    out["gradient_same_params"] = set(got) == set(expected)
    out["gradient_rel_err_max_per_param"] = max(_rel(got[n], expected[n]) for n in expected if expected[n].abs().max() > 0)
    diff = torch.cat([(got[n] - expected[n]).flatten() for n in expected])
    out["gradient_rel_err_global_l2"] = float(diff.norm() / torch.cat([g.flatten() for g in expected.values()]).norm())
    return out


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
    return _to(inputs, device), _spans_to(spans, device)


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

    def lens_on(query):
        def run():
            with lens.capture(query, spans["image"], spans["system"]) as cap:
                model(**inputs, logits_to_keep=1)
            return cap.masses
        return run

    rows = []
    with torch.no_grad():
        for method, fn, impl in (("sdpa", sdpa, "sdpa"), ("lens U", lens_on(spans["user"]), "sdpa"),
                                 ("lens R", lens_on(spans["response"]), "sdpa"), ("eager", eager, "eager")):
            model.set_attn_implementation(impl)
            ms, mib = _timed(fn, device, repeats)
            rows.append({"length": length, "method": method, "ms": ms, "peak_mib": mib,
                         "n_image": int(spans["image"].sum()), "n_user": int(spans["user"].sum()),
                         "n_response": int(spans["response"].sum())})
            print(json.dumps(rows[-1]), flush=True)
    return rows


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
    parser.add_argument("--skip", nargs="*", default=[], choices=["exactness", "vas", "train"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "family": args.family, "shape": args.shape}
    import transformers
    report["transformers"] = transformers.__version__

    def save():
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))

    if "exactness" not in args.skip:
        report["exactness"] = exactness(device, args.family)
        print(json.dumps(report["exactness"]), flush=True)
        save()
    if "vas" in args.skip and "train" in args.skip:
        return 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shape == "7b" and args.family != "qwen2_5_vl":
        parser.error("--shape 7b names the Qwen2.5-VL shape; use --shape full")
    model, processor, n_params = build_shaped_model(args.family, args.shape, device, dtype)
    report["parameters"] = n_params
    report["weights_mib"] = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None
    if "vas" not in args.skip:
        report["vas_forward"] = vas_forward(model, processor, device, args.vas_lengths, args.repeats)
        save()
    if "train" not in args.skip:
        model.requires_grad_(True)
        report["train_step"] = train_step(model, processor, device, args.train_lengths, args.repeats)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
