"""Accuracy and model-level VAS of a checkpoint on a benchmark:
``python -m trainer.eval --model M --data D [--split testmini] [--max-samples N]``.

- accuracy: greedy generation, the last ``<answer>`` of the output (the last non-empty line when
  a model writes no tags) graded by :func:`pipeline.verify.answers_match`;
- VAS: the paper's model-level score (:func:`pipeline.vas.scoring.model_vas`: user-token queries,
  prefill only), raw and size-normalized, on the same prompts.

Accepts MathVista-style rows (``decoded_image``/``image``, ``query``/``question``, ``answer``,
``answer_type``, ``question_type``, ``choices``) and AVAR test splits. Prints a markdown table
and writes a JSON report, so before/after runs can sit next to the paper's numbers.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from pipeline.response_format import extract_answer, format_ok
from pipeline.vas import ScoreError, VASItem
from pipeline.vas.scoring import model_vas
from pipeline.verify import answers_match
from pipeline.vlm import build_inputs, load_model_and_processor
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
    max_pixels: int = field(default=262144, metadata={"help": "Image budget per image, as in training."})
    format_hint: bool = field(default=True, metadata={
        "help": "Ask for <think>/<answer> output in prompts built from question columns (AVAR rows carry "
                "their own prompt)."})
    vas_layers: list[int] | None = field(default=None, metadata={
        "help": "Decoder layers VAS averages over (negative from the end); all when unset (paper)."})
    skip_accuracy: bool = field(default=False, metadata={"help": "Only compute VAS (no generation)."})
    skip_vas: bool = field(default=False, metadata={"help": "Only compute accuracy."})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), bfloat16, "
                                                 "float16 or float32."})
    device: str | None = field(default=None, metadata={"help": "Torch device; cuda when available, else cpu."})
    output: str | None = field(default=None, metadata={
        "help": "JSON report path; default <model folder or runs/eval>/eval_<data name>_<split>.json."})


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
def generate(model, processor, examples: list[EvalExample], config: EvalConfig) -> list[str]:
    device = next(model.parameters()).device
    texts: list[str] = []
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for start in tqdm(range(0, len(examples), config.batch_size), desc="generate", unit="batch"):
        chunk = examples[start:start + config.batch_size]
        batch = build_inputs(processor, [e.messages() for e in chunk], [e.images for e in chunk],
                             add_generation_prompt=True, padding_side="left", max_pixels=config.max_pixels)
        batch = batch.to(device)
        out = model.generate(**batch, max_new_tokens=config.max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        texts += processor.batch_decode(new_tokens, skip_special_tokens=True)
    return texts


def evaluate(config: EvalConfig) -> dict[str, Any]:
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    model, processor = load_model_and_processor(config.model, dtype=resolve_dtype(dtype))
    model = model.to(device).eval()
    table = load_table(config.data, split=config.split, config=config.data_config, max_samples=config.max_samples)
    examples = eval_examples(table, format_hint=config.format_hint)
    report: dict[str, Any] = {"model": config.model, "data": config.data, "split": config.split,
                              "n": len(examples), "max_pixels": config.max_pixels, "config": asdict(config)}
    per_sample = {e.id: {"id": e.id} for e in examples}
    if not config.skip_accuracy:
        graded = [grade(e, t) for e, t in zip(examples, generate(model, processor, examples, config), strict=True)]
        for g in graded:
            per_sample[g["id"]].update(g)
        report["accuracy"] = sum(g["correct"] for g in graded) / len(graded)
        report["answer_tag_rate"] = sum(g["answer_tag"] for g in graded) / len(graded)
        report["format_rate"] = sum(g["format_ok"] for g in graded) / len(graded)
    if not config.skip_vas:
        items = [VASItem(key=e.id, images=e.images, question=e.prompt) for e in examples]
        vas = model_vas(model, processor, items, layers=config.vas_layers, batch_size=config.batch_size,
                        max_pixels=config.max_pixels, model_name=config.model)
        report["vas"] = {"raw": vas.raw, "normalized": vas.normalized, "n_scored": vas.n_scored,
                         "n_skipped": vas.n_skipped}
        for example, score in zip(examples, vas.per_sample, strict=True):
            if isinstance(score, ScoreError):
                per_sample[example.id]["vas_error"] = score.reason
            else:
                per_sample[example.id].update(vas_raw=score["raw"], vas_normalized=score["normalized"])
    report["per_sample"] = list(per_sample.values())
    return report


def markdown_table(report: dict[str, Any]) -> str:
    def cell(value: Any, scale: float = 1.0) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value * scale:.1f}" if scale != 1.0 else f"{value:.2f}"

    vas = report.get("vas") or {}
    head = "| model | data | n | accuracy (%) | format (%) | VAS raw | VAS size-normalized |"
    row = (f"| {report['model']} | {report['data']}:{report['split']} | {report['n']} | "
           f"{cell(report.get('accuracy'), 100)} | {cell(report.get('format_rate'), 100)} | "
           f"{cell(vas.get('raw'))} | {cell(vas.get('normalized'))} |")
    return f"{head}\n|---|---|---|---|---|---|---|\n{row}"


def default_output(config: EvalConfig) -> Path:
    name = Path(config.data.rstrip("/")).name.replace("/", "_") or "data"
    folder = Path(config.model) if Path(config.model).is_dir() else Path("runs") / "eval"
    return folder / f"eval_{name}_{config.split}.json"


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
