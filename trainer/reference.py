"""Train the learned reference model from scratch: ``python -m trainer.reference --out DIR``.

A tiny Qwen2.5-VL (:func:`pipeline.vlm.tiny.build_tiny_model`, the recipe's sizes) learns the
procedural ``shapes`` scenes with a plain LM loss on the response tokens (the R span of
:mod:`pipeline.vlm.spans`, the same tokens TRL's assistant-only loss trains). Half the samples
ask "Describe the shapes." and are answered with every shape's colour and kind in reading order; the rest
are the family's questions with their one-word answers. Dense targets are what make a model this
small look at the image: with short answers only it sits at chance for the first ~1,000 steps.

The loop is short on purpose (nanoGPT style): scenes are drawn on the fly from a seeded stream
(each batch prepared in a background thread), so there is no dataset to store, and layouts whose
signature falls in the held-out bucket are never trained on. At the end the weights are saved
(float16: half the size in the repository; the config says float32, so every consumer computes in
float32), loaded back, and evaluated on held-out samples with the real image and with a blank
canvas, against the blind baseline (the most common answer of each task); the manifest records the
recipe, the evaluation and the weights' digest (:mod:`pipeline.vlm.reference`). ``--blank-images``
trains the control model that never sees a scene.

    python -m trainer.reference --out models/tiny-shapes            # the shipped model (~12 min, 2 cores)
    python -m trainer.reference --out /tmp/blind --blank-images     # the control model
    python -m trainer.reference --evaluate models/tiny-shapes       # re-measure a folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.atomic import replace_dir, write_json_atomic
from pipeline.ids import file_sha256
from pipeline.seeds.families import shapes as scenes
from pipeline.vlm import build_inputs, compute_spans, load_model_and_processor
from pipeline.vlm.reference import (
    MANIFEST,
    REFERENCE_RECIPE,
    WEIGHTS,
    ReferenceRecipe,
    recipe_digest,
)
from pipeline.vlm.tiny import build_tiny_model

BLANK = (255, 255, 255)
DESCRIBE_TASK = "describe"


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str  # what the model is trained to write, and graded on (exact match)
    task: str
    shapes: list[dict]


def layout_signature(shapes: list[dict]) -> str:
    return "|".join(f"{s['cell']}:{s['color']} {s['kind']}" for s in sorted(shapes, key=lambda s: s["cell"]))


def is_held_out(shapes: list[dict], every: int) -> bool:
    """Whether a layout belongs to the held-out bucket (by hash, so both splits agree forever)."""
    return int(hashlib.sha256(layout_signature(shapes).encode()).hexdigest(), 16) % every == 0


def description(shapes: list[dict]) -> str:
    """The dense target: every shape in reading order (rows top to bottom, left to right) with
    its colour and kind, e.g. "red circle, blue square". Naming the cells too ("top left: red
    circle; ...") was learned far more slowly beside one-word answers (exact descriptions 0.27 at
    1,500 steps against 0.93; BENCHMARKS.md)."""
    ordered = sorted(shapes, key=lambda s: scenes.CELLS.index(s["cell"]))
    return ", ".join(f"{s['color']} {s['kind']}" for s in ordered)


def samples(recipe: ReferenceRecipe, held_out: bool, seed: int, with_describe: bool) -> Iterator[Sample]:
    """An endless seeded stream of training (``held_out=False``) or held-out samples."""
    rng = random.Random(f"avar-reference/{seed}/{held_out}")
    lo, hi = recipe.levels
    while True:
        level = rng.randint(lo, hi)
        shapes = scenes.draw_layout(rng, level)
        if is_held_out(shapes, recipe.held_out_every) != held_out:
            continue
        canvas, _ = scenes.render(shapes, recipe.image_size, rng)
        image = canvas.image.convert("RGB")
        if with_describe and rng.random() < recipe.describe_fraction:
            yield Sample(image, recipe.describe_prompt, description(shapes), DESCRIBE_TASK, shapes)
            continue
        query = scenes.draw_query(rng, level, shapes)
        if query is not None and query["task"] in recipe.tasks:
            yield Sample(image, scenes.question_of(query), str(scenes.answer_of(query, shapes)), query["task"], shapes)


def take(stream: Iterator[Sample], n: int) -> list[Sample]:
    return [next(stream) for _ in range(n)]


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, BLANK)


def conversation(sample: Sample, system_prompt: str, with_answer: bool) -> list[dict]:
    turns = [{"role": "system", "content": system_prompt},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    if with_answer:
        turns.append({"role": "assistant", "content": sample.answer})
    return turns


def training_batch(processor, batch: list[Sample], recipe: ReferenceRecipe) -> dict:
    """Model inputs with ``labels`` on the response tokens only."""
    images = [[blank_like(s.image) if recipe.blank_images else s.image] for s in batch]
    inputs = build_inputs(processor, [conversation(s, recipe.system_prompt, True) for s in batch], images,
                          max_pixels=recipe.max_pixels)
    spans = compute_spans(inputs["input_ids"], inputs["attention_mask"], processor)
    inputs["labels"] = inputs["input_ids"].masked_fill(~spans.response, -100)
    return inputs


def learning_rate(recipe: ReferenceRecipe, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 0 at the last step (1-based ``step``)."""
    if step <= recipe.warmup_steps:
        return recipe.lr * step / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def tokenizer_corpus(recipe: ReferenceRecipe) -> tuple[str, ...]:
    """Texts the model will read and write: training samples' questions and targets, and the
    programmatic teacher's descriptions and anchored chains of the family's seeds."""
    from pipeline.seeds import generate_problem
    from pipeline.synthesis.teachers.programmatic import write

    stream = samples(recipe, held_out=False, seed=recipe.seed + 1, with_describe=True)
    lines = [text for s in take(stream, recipe.tokenizer_corpus) for text in (s.question, s.answer)]
    for seed in range(recipe.tokenizer_corpus // 10):
        record = generate_problem(recipe.family, seed, 1 + seed % 3, recipe.image_size, 0.0)
        lines += [write(stage, record) for stage in ("describe", "anchor")]
    return tuple(lines)


def new_model(recipe: ReferenceRecipe):
    """The untrained model and processor of the recipe (seeded random weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "init", seed=recipe.seed, vocab_size=recipe.vocab_size,
                                  max_pixels=recipe.max_pixels, min_pixels=recipe.max_pixels,
                                  vision=dict(recipe.vision), corpus=tokenizer_corpus(recipe), **dict(recipe.text))
        model, processor = load_model_and_processor(folder, dtype=torch.float32)
    return model, processor


def response_loss(model, batch: dict) -> torch.Tensor:
    """The LM loss on the labelled (response) tokens (mean over them, as the model's own loss),
    with the output layer applied to those rows only: it was a third of a step over every row."""
    labels = batch["labels"][:, 1:]
    hidden = model.model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state[:, :-1]
    keep = labels != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]).float(), labels[keep])


def batches(processor, recipe: ReferenceRecipe, stream: Iterator[Sample]) -> Iterator[dict]:
    """Training batches, each prepared in a background thread while the previous one trains
    (drawing and preprocessing 32 images was a quarter of a step)."""
    from concurrent.futures import ThreadPoolExecutor

    draw = lambda: training_batch(processor, take(stream, recipe.batch_size), recipe)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(draw)
        while True:
            ready, pending = pending.result(), pool.submit(draw)
            yield ready


def train_steps(model, processor, recipe: ReferenceRecipe, stream: Iterator[dict], steps: range,
                optimizer: torch.optim.Optimizer, on_step=None) -> list[float]:
    """Run ``steps`` (1-based step numbers of the recipe's schedule) on the batches of
    ``stream``; returns the losses."""
    model.train()
    losses = []
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, step)
        loss = response_loss(model, next(stream))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def optimizer_for(model, recipe: ReferenceRecipe) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98),
                             weight_decay=recipe.weight_decay)


def held_out_samples(recipe: ReferenceRecipe, n: int, seed: int = 1, with_describe: bool = True) -> list[Sample]:
    """``n`` samples of layouts never trained on (descriptions among them at the training rate)."""
    return take(samples(recipe, held_out=True, seed=seed, with_describe=with_describe), n)


@torch.no_grad()
def answers(model, processor, questions: list[Sample], recipe: ReferenceRecipe, blank: bool,
            batch_size: int = 50) -> list[str]:
    """Greedy answers (at most 48 new tokens: a description of three shapes is ~25) to
    ``questions``, with the image or a blank canvas of its size."""
    model.eval()
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        images = [[blank_like(s.image) if blank else s.image] for s in chunk]
        inputs = build_inputs(processor, [conversation(s, recipe.system_prompt, False) for s in chunk], images,
                              add_generation_prompt=True, padding_side="left", max_pixels=recipe.max_pixels)
        generated = model.generate(**inputs, max_new_tokens=48, do_sample=False, eos_token_id=eos,
                                   pad_token_id=processor.tokenizer.pad_token_id)
        out += [t.strip() for t in processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                                          skip_special_tokens=True)]
    return out


def write_probe(recipe: ReferenceRecipe, folder: Path, n: int = 300, seed: int = 2,
                tasks: tuple[str, ...] | None = None) -> Path:
    """Held-out questions of ``tasks`` (default: the graded ones) as a dataset folder that
    ``trainer.eval`` and ``trainer.lal`` read (``images``, ``problem``, ``answer``, ``answer_type``,
    ``task``), written atomically. Descriptions are graded as text: exact match, case and spacing
    aside."""
    import datasets

    tasks = tasks or recipe.graded_tasks
    stream = samples(recipe, held_out=True, seed=seed, with_describe=DESCRIBE_TASK in tasks)
    graded = []
    while len(graded) < n:
        sample = next(stream)
        if sample.task in tasks:
            graded.append(sample)
    rows = [{"id": f"probe-{i:04d}", "images": [s.image], "problem": s.question, "answer": s.answer,
             "answer_type": "number" if s.task.startswith("count") else "text", "task": s.task,
             "source": "reference/probe"} for i, s in enumerate(graded)]
    features = datasets.Features({"id": datasets.Value("string"), "images": datasets.Sequence(datasets.Image()),
                                  "problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "answer_type": datasets.Value("string"), "task": datasets.Value("string"),
                                  "source": datasets.Value("string")})
    with replace_dir(folder) as tmp:
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp))
    return folder


def blind_baseline(questions: list[Sample]) -> float:
    """Accuracy of always giving the most common answer of the question's task (what a model
    that cannot see can reach at best on this set), averaged over the tasks."""
    by_task: dict[str, Counter] = {}
    for s in questions:
        by_task.setdefault(s.task, Counter())[s.answer] += 1
    return sum(c.most_common(1)[0][1] / c.total() for c in by_task.values()) / len(by_task)


def evaluate(model, processor, recipe: ReferenceRecipe, n: int | None = None) -> dict:
    """Held-out accuracy on the graded tasks with the image and with a blank canvas (the mean of
    the tasks' accuracies, each task weighing the same), their blind baseline, and every task's
    accuracy (by number of shapes too) as ``[accuracy, n]``."""
    held_out = held_out_samples(recipe, n or recipe.eval_samples)
    graded = [s for s in held_out if s.task in recipe.graded_tasks]
    result = {"n": len(graded), "graded_tasks": list(recipe.graded_tasks),
              "blind_baseline": round(blind_baseline(graded), 4), "n_all_tasks": len(held_out)}
    for name, blank in (("image", False), ("blank", True)):
        said = answers(model, processor, held_out, recipe, blank)
        per_task: dict[str, list[bool]] = {}
        for answer, s in zip(said, held_out, strict=True):
            for key in (s.task, f"{s.task} ({len(s.shapes)} shapes)"):
                per_task.setdefault(key, []).append(answer == s.answer)
        rate = {t: sum(v) / len(v) for t, v in per_task.items()}
        result[f"accuracy_{name}"] = round(sum(rate[t] for t in recipe.graded_tasks) / len(recipe.graded_tasks), 4)
        result[f"per_task_{name}"] = {t: [round(rate[t], 4), len(per_task[t])] for t in sorted(per_task)}
    return result


def save(model, processor, folder: Path, manifest: dict) -> None:
    """Weights in float16 (config: float32), processor and manifest, written atomically."""
    with replace_dir(folder) as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        model.to(torch.float32)
        config = json.loads((tmp / "config.json").read_text())
        for section in (config, config.get("text_config") or {}, config.get("vision_config") or {}):
            if "dtype" in section:
                section["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        processor.save_pretrained(tmp)
        write_manifest(tmp, manifest)


def write_manifest(folder: Path, manifest: dict) -> None:
    """The manifest with the digest of the weights as they are on disk."""
    write_json_atomic(folder / MANIFEST, {**manifest, "weights_sha256": file_sha256(folder / WEIGHTS)})


def reproduce_command(recipe: ReferenceRecipe, out: Path) -> str:
    """The command that trains ``recipe`` into ``out`` (where checkpoints go changes no weight)."""
    command = f"python -m trainer.reference --out {out}"
    if recipe.blank_images:
        command += " --blank-images"
    if recipe.steps != REFERENCE_RECIPE.steps:
        command += f" --steps {recipe.steps}"
    return command


def environment() -> dict:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "machine": platform.machine()}


def train(recipe: ReferenceRecipe, out: Path, checkpoints: Path | None = None, progress: bool = True) -> dict:
    """Train, save ``out`` (and ``checkpoints/step-N``), evaluate the saved weights; the manifest."""
    torch.manual_seed(recipe.seed)
    model, processor = new_model(recipe)
    optimizer = optimizer_for(model, recipe)
    stream = batches(processor, recipe, samples(recipe, held_out=False, seed=recipe.seed, with_describe=True))
    base = {"name": out.name, "parameters": sum(p.numel() for p in model.parameters()),
            "recipe": asdict(recipe), "recipe_digest": recipe.digest(),
            "command": reproduce_command(recipe, out), "environment": environment()}
    bar = tqdm(total=recipe.steps, desc="reference model", unit="step", disable=not progress)
    started, losses = time.time(), []

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / 25:.4f}")
        if checkpoints is not None and step in recipe.checkpoint_steps:
            save(model, processor, checkpoints / f"step-{step}", {**base, "step": step})

    train_steps(model, processor, recipe, stream, range(1, recipe.steps + 1), optimizer, on_step)
    bar.close()
    seconds = time.time() - started
    save(model, processor, out, {**base, "step": recipe.steps})
    trained, processor = load_model_and_processor(out, dtype=torch.float32)  # what ships, as it loads
    evaluation = evaluate(trained, processor, recipe)
    tail = losses[-100:]
    manifest = {**base, "step": recipe.steps, "evaluation": evaluation,
                "training": {"seconds": round(seconds), "final_loss": round(sum(tail) / len(tail), 4)}}
    write_manifest(out, manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m trainer.reference", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="folder of the trained model (replaced if it exists)")
    parser.add_argument("--checkpoints", help="folder for checkpoints/step-N (default: none kept)")
    parser.add_argument("--blank-images", action="store_true", help="train the control model on blank canvases")
    parser.add_argument("--steps", type=int, help="override the recipe's steps (the manifest records it)")
    parser.add_argument("--evaluate", metavar="FOLDER", help="only evaluate a trained folder (held-out accuracy)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the shipped model: 2)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    recipe = REFERENCE_RECIPE
    if args.blank_images:
        recipe = replace(recipe, blank_images=True)
    if args.steps:
        recipe = replace(recipe, steps=args.steps,
                         checkpoint_steps=tuple(s for s in recipe.checkpoint_steps if s < args.steps))
    if args.evaluate:
        manifest = json.loads((Path(args.evaluate) / MANIFEST).read_text())
        model, processor = load_model_and_processor(args.evaluate, dtype=torch.float32)
        result = evaluate(model, processor, ReferenceRecipe.from_dict(manifest["recipe"]))
        print(json.dumps(result, indent=2))
        return result
    if not args.out:
        parser.error("--out is required (or --evaluate FOLDER)")
    manifest = train(recipe, Path(args.out), Path(args.checkpoints) if args.checkpoints else None)
    assert recipe_digest(manifest["recipe"]) == manifest["recipe_digest"]
    ev = manifest["evaluation"]
    print(f"{args.out}: held-out accuracy {ev['accuracy_image']:.3f} with the image, {ev['accuracy_blank']:.3f} "
          f"with a blank canvas (blind baseline {ev['blind_baseline']:.3f}); {manifest['training']['seconds']} s")
    return manifest


if __name__ == "__main__":
    main()
