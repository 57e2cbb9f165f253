"""Accuracy and model-level VAS of a checkpoint on a benchmark:
``python -m trainer.eval --model M --data D [--split testmini] [--max-samples N]``.

- accuracy: greedy generation, the last ``<answer>`` of the output (the last non-empty line when
  a model writes no tags) graded by :func:`pipeline.verify.answers_match`;
- VAS: the paper's model-level score (:func:`pipeline.vas.scoring.model_vas`: user-token queries,
  prefill only), raw and size-normalized, on the same prompts, with its companions: the ratio
  of averaged masses and the attention budget of the user queries (system / image / user text /
  response / rest shares, :mod:`pipeline.lens.budget`);
- ``--intervention`` (a_img, a_sys, layers): the same rows again under the training-free
  intervention (:mod:`pipeline.lens.intervention`), both in one report.

``max_pixels`` defaults to the image budget the checkpoint was trained with (its saved
processor), so VAS is measured at the training resolution. The default report path is under
``$AVAR_CACHE`` (``~/.cache/avar/eval/``), never inside the source tree.

Accepts MathVista-style rows (``decoded_image``/``image``, ``query``/``question``, ``answer``,
``answer_type``, ``question_type``, ``choices``) and AVAR test splits. Prints a markdown table
and writes a JSON report, so before/after runs can sit next to the paper's numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from pipeline.lens.budget import BUDGET_NAMES
from pipeline.lens.intervention import InterventionConfig, intervene
from pipeline.paper import DEFAULT_SYSTEM_PROMPT
from pipeline.response_format import extract_answer, format_ok
from pipeline.vas import ScoreError, VASItem
from pipeline.vas.scoring import model_vas
from pipeline.verify import answers_match
from pipeline.vlm import (
    SpecialTokens,
    adapter_for,
    build_inputs,
    compute_spans,
    load_model_and_processor,
)
from pipeline.vlm.inputs import image_token_pixels
from pipeline.vlm.loading import for_inference
from trainer.data import EvalExample, eval_examples, load_table
from trainer.models import resolve_dtype


@dataclass
class EvalConfig:
    model: str = field(metadata={"help": "Checkpoint to evaluate: a folder, a Hub id, or 'tiny'."})
    data: str = field(metadata={"help": "Benchmark: a dataset folder or Hub id (MathVista-style or AVAR columns)."})
    split: str = field(default="test", metadata={"help": "Split to evaluate (MathVista: testmini)."})
    data_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows."})
    batch_size: int = field(default=4, metadata={"help": "Prompts per generation / VAS forward pass."})
    max_new_tokens: int = field(default=2048, metadata={"help": "Generation budget per answer."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Image budget per image; default: the checkpoint's own (its saved processor, i.e. the "
                "training config's max_pixels). VAS grows with resolution: compare at one budget."})
    format_hint: bool = field(default=True, metadata={
        "help": "Ask for <think>/<answer> output in prompts built from question columns (AVAR rows carry "
                "their own prompt)."})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={
        "help": "System turn written explicitly into every prompt (generation and VAS alike; recorded "
                "in the report)."})
    vas_layers: list[int] | None = field(default=None, metadata={
        "help": "Decoder layers VAS averages over (negative from the end); all when unset (paper)."})
    skip_accuracy: bool = field(default=False, metadata={"help": "Only compute VAS (no generation)."})
    skip_vas: bool = field(default=False, metadata={"help": "Only compute accuracy."})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), bfloat16, "
                                                 "float16 or float32."})
    device: str | None = field(default=None, metadata={"help": "Torch device; cuda when available, else cpu."})
    output: str | None = field(default=None, metadata={
        "help": "JSON report path; default $AVAR_CACHE/eval/<model>/eval_<data name>_<split>.json "
                "(~/.cache/avar/eval), outside the source tree."})
    intervention: bool = field(default=False, metadata={
        "help": "Evaluate the same rows a second time under the training-free intervention (a_img, "
                "a_sys, intervention_layers) and report both."})
    a_img: float = field(default=0.15, metadata={"help": "Intervention: image-key logits x (1 + a_img)."})
    a_sys: float = field(default=0.05, metadata={"help": "Intervention: system-key logits x (1 - a_sys)."})
    intervention_layers: list[int] | None = field(default=None, metadata={
        "help": "Intervention: decoder layers (negative from the end); all when unset."})


def predicted_answer(text: str) -> tuple[str | None, bool]:
    """``(answer, from_tag)``: the last ``<answer>`` body, else the last non-empty line."""
    tagged = extract_answer(text)
    if tagged is not None:
        return tagged, True
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return (lines[-1] if lines else None), False


def grade(example: EvalExample, text: str) -> dict:
    """Per-sample result of one generated output."""
    predicted, from_tag = predicted_answer(text)
    correct = predicted is not None and answers_match(predicted, example.answer, example.answer_type or "text",
                                                      example.choices)
    return {"id": example.id, "predicted": predicted, "gold": example.answer, "answer_type": example.answer_type,
            "correct": bool(correct), "answer_tag": from_tag, "format_ok": format_ok(text),
            "output": text}


@torch.no_grad()
def generate(model, processor, examples: list[EvalExample], config: EvalConfig,
             intervention: InterventionConfig | None = None) -> list[str]:
    device = next(model.parameters()).device
    texts: list[str] = []
    eos = SpecialTokens.from_tokenizer(processor).im_end  # the turn end of the model's chat format
    folded = adapter_for(processor).chat_format.folded_system
    for start in tqdm(range(0, len(examples), config.batch_size), desc="generate", unit="batch"):
        chunk = examples[start:start + config.batch_size]
        batch = build_inputs(processor, [e.messages(config.system_prompt, folded) for e in chunk], [e.images for e in chunk],
                             add_generation_prompt=True, padding_side="left", max_pixels=config.max_pixels)
        batch = batch.to(device)
        scaled = contextlib.nullcontext()
        if intervention is not None:
            spans = compute_spans(batch["input_ids"], batch["attention_mask"], processor).to(device)
            scaled = intervene(model, spans.image, spans.system, intervention)
        with scaled:
            out = model.generate(**batch, max_new_tokens=config.max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        texts += processor.batch_decode(new_tokens, skip_special_tokens=True)
    return texts


def checkpoint_max_pixels(processor) -> int | None:
    """The image budget a checkpoint's saved processor applies (what it was trained with)."""
    image_processor = getattr(processor, "image_processor", None)
    value = getattr(image_processor, "max_pixels", None)
    if value is None:
        value = (getattr(image_processor, "size", None) or {}).get("longest_edge")
    return int(value) if value else None


def evaluate(config: EvalConfig) -> dict[str, Any]:
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    model, processor = load_model_and_processor(config.model, dtype=resolve_dtype(dtype))
    model = for_inference(model).to(device).eval()
    source = "given"
    if image_token_pixels(processor) is None:  # fixed tokens per image: no budget applies
        config, source = replace(config, max_pixels=None), "fixed image tokens"
    elif config.max_pixels is None:
        config = replace(config, max_pixels=checkpoint_max_pixels(processor) or 262144)
        source = "checkpoint processor"
    table = load_table(config.data, split=config.split, config=config.data_config, max_samples=config.max_samples)
    examples = eval_examples(table, format_hint=config.format_hint)
    report: dict[str, Any] = {"model": config.model, "data": config.data, "split": config.split,
                              "n": len(examples), "max_pixels": config.max_pixels, "max_pixels_from": source,
                              "system_prompt": config.system_prompt, "model_family": adapter_for(processor).family,
                              "config": asdict(config)}
    report.update(measure(model, processor, examples, config, None))
    if config.intervention:
        setting = InterventionConfig(a_img=config.a_img, a_sys=config.a_sys, layers=config.intervention_layers)
        report["intervention"] = {"setting": asdict(setting), **measure(model, processor, examples, config, setting)}
    return report


def measure(model, processor, examples: list[EvalExample], config: EvalConfig,
         intervention: InterventionConfig | None) -> dict[str, Any]:
    """Accuracy, VAS and the attention budget of ``examples`` (under ``intervention`` if given)."""
    out: dict[str, Any] = {}
    per_sample = {e.id: {"id": e.id} for e in examples}
    if not config.skip_accuracy:
        texts = generate(model, processor, examples, config, intervention)
        graded = [grade(e, t) for e, t in zip(examples, texts, strict=True)]
        for g in graded:
            per_sample[g["id"]].update(g)
        out["accuracy"] = sum(g["correct"] for g in graded) / len(graded)
        out["answer_tag_rate"] = sum(g["answer_tag"] for g in graded) / len(graded)
        out["format_rate"] = sum(g["format_ok"] for g in graded) / len(graded)
    if not config.skip_vas:
        items = [VASItem(key=e.id, images=e.images, question=e.prompt) for e in examples]
        vas = model_vas(model, processor, items, layers=config.vas_layers, batch_size=config.batch_size,
                        max_pixels=config.max_pixels, model_name=config.model, intervention=intervention,
                        system_prompt=config.system_prompt)
        out["vas"] = {"raw": vas.raw, "normalized": vas.normalized, "n_scored": vas.n_scored,
                      "n_skipped": vas.n_skipped, **vas.companions()}
        for example, score in zip(examples, vas.per_sample, strict=True):
            if isinstance(score, ScoreError):
                per_sample[example.id]["vas_error"] = score.reason
            else:
                per_sample[example.id].update(vas_raw=score["raw"], vas_normalized=score["normalized"],
                                              budget=score["budget"])
    out["per_sample"] = list(per_sample.values())
    return out


def markdown_table(report: dict[str, Any]) -> str:
    def cell(value: Any, scale: float = 1.0) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value * scale:.1f}" if scale != 1.0 else f"{value:.2f}"

    def row(label: str, part: dict) -> str:
        vas = part.get("vas") or {}
        budget = vas.get("budget") or {}
        return (f"| {report['model']} | {label} | {report['data']}:{report['split']} | {report['n']} | "
                f"{cell(part.get('accuracy'), 100)} | {cell(part.get('format_rate'), 100)} | "
                f"{cell(vas.get('raw'))} | {cell(vas.get('normalized'))} | {cell(vas.get('ratio_of_means'))} | "
                + " | ".join(cell(budget.get(k)) for k in BUDGET_NAMES) + " |")

    head = ("| model | attention | data | n | accuracy (%) | format (%) | VAS raw | VAS size-normalized | "
            "VAS ratio of means | " + " | ".join(f"{k} share" for k in BUDGET_NAMES) + " |")
    rows = [row("as trained", report)]
    if report.get("intervention"):
        setting = report["intervention"]["setting"]
        rows.append(row(f"intervention a_img={setting['a_img']} a_sys={setting['a_sys']}", report["intervention"]))
    return "\n".join([head, "|" + "---|" * head.count(" | ") + "---|", *rows])


def default_output(config: EvalConfig) -> Path:
    """Under ``$AVAR_CACHE/eval`` (default ``~/.cache/avar/eval``): never inside the source tree."""
    name = Path(config.data.rstrip("/")).name.replace("/", "_") or "data"
    model = Path(config.model.rstrip("/")).name.replace("/", "_") or "model"
    root = Path(os.environ.get("AVAR_CACHE") or Path.home() / ".cache" / "avar") / "eval"
    suffix = f"_intervention-{config.a_img}-{config.a_sys}" if config.intervention else ""
    return root / model / f"eval_{name}_{config.split}{suffix}.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = HfArgumentParser(EvalConfig)
    (config,) = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    report = evaluate(config)
    path = Path(config.output) if config.output else default_output(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(markdown_table(report))
    print(f"\nreport: {path}")
    return report


if __name__ == "__main__":
    main()
