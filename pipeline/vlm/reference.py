"""The learned reference model ``tiny-shapes``: a tiny Qwen2.5-VL trained here, from scratch, to
see the procedural ``shapes`` scenes, so that VAS, the filter, AGTO and VARS can be watched on
attention that means something (every other tiny model has random weights).

Its weights ship in the repository (``models/tiny-shapes/``, a few MB, packaged as
``pipeline.resources.models``) beside ``avar_reference.json``, the manifest the training
command writes: the :class:`ReferenceRecipe` it followed, the weights' sha256, and the
held-out evaluation it measured (accuracy with the image, with a blank image, and the blind
baseline). ``python -m trainer.reference`` reproduces it from the recipe.

Every load of a folder holding a manifest is checked first (:func:`verify_reference`): the
weights must hash to the recorded digest, the recorded recipe to its recorded digest, and the
``tiny-shapes`` alias additionally requires the recipe of this code (:data:`REFERENCE_RECIPE`).
Weights from another recipe, a half-written copy or a Git LFS pointer are refused with a
message saying what differs and how to rebuild, never scored silently.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from pipeline.errors import PermanentError
from pipeline.ids import file_sha256, stable_hash
from pipeline.paper import DEFAULT_SYSTEM_PROMPT

REFERENCE_ALIAS = "tiny-shapes"
MANIFEST = "avar_reference.json"
WEIGHTS = "model.safetensors"


class ReferenceModelError(ValueError, PermanentError):
    """A reference-model folder whose weights or recipe do not match its manifest (or the code)."""


@dataclass(frozen=True)
class ReferenceRecipe:
    """Everything that decides the reference model's weights (with the torch build and the
    number of threads, which the manifest records beside it)."""

    seed: int = field(default=0, metadata={"help": "Seed of the initial weights and of the scene stream."})
    family: str = field(default="shapes", metadata={"help": "Procedural seed family the scenes come from."})
    levels: tuple[int, int] = field(default=(1, 3), metadata={
        "help": "Difficulty levels of the scenes (min, max): 1-3 shapes on the 2x2 grid."})
    image_size: int = field(default=320, metadata={"help": "Canvas side the scenes are drawn at (as in the seeds)."})
    max_pixels: int = field(default=112 * 112, metadata={
        "help": "Image budget of the processor: 112x112 px, 16 image tokens per image."})
    blank_images: bool = field(default=False, metadata={
        "help": "Train on blank canvases instead of the scenes (the control model: it cannot see)."})
    describe_fraction: float = field(default=0.5, metadata={
        "help": "Share of training samples asking 'Describe the shapes.', answered with every shape's colour and "
                "kind in reading order (dense targets: with short answers only, a model this small stays at chance)."})
    describe_prompt: str = field(default="Describe the shapes.", metadata={"help": "User text of the dense samples."})
    tasks: tuple[str, ...] = field(default=("count", "color_of", "shape_of"), metadata={
        "help": "The family's question types trained on (pipeline.seeds.families.shapes), answered with the word."})
    graded_tasks: tuple[str, ...] = field(default=("describe", "count"), metadata={
        "help": "The held-out accuracy of the manifest (the >= 0.95 criterion) is over these; every task's own "
                "accuracy is recorded beside it. Questions that name a shape by what it looks like ('What color is "
                "the circle?') stayed at 0.6-0.9 in every format tried in 15 minutes of training (BENCHMARKS.md)."})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "Explicit system turn of every sample."})
    held_out_every: int = field(default=10, metadata={
        "help": "Scene layouts whose signature hash is 0 modulo this are held out: never trained on, "
                "only evaluated."})
    vocab_size: int = field(default=2048, metadata={"help": "Tokenizer vocabulary (the tiny models' BPE)."})
    tokenizer_corpus: int = field(default=2000, metadata={
        "help": "Scene texts (questions, descriptions, the programmatic teacher's chains) added to the "
                "tokenizer's corpus, so 'yellow' or '</answer>' is one token, not four or five."})
    text: tuple[tuple[str, int], ...] = field(default=(
        ("hidden_size", 128), ("num_hidden_layers", 4), ("num_attention_heads", 4),
        ("num_key_value_heads", 2), ("intermediate_size", 256)), metadata={"help": "Language-model config."})
    vision: tuple[tuple[str, int], ...] = field(default=(
        ("hidden_size", 64), ("intermediate_size", 128), ("num_heads", 2), ("depth", 2)),
        metadata={"help": "Vision-tower config (patch 14, merge 2 as in Qwen2.5-VL)."})
    steps: int = field(default=2500, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Samples per step."})
    lr: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up, then cosine decay to 0."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Global gradient-norm clip."})
    checkpoint_steps: tuple[int, ...] = field(default=(125, 250, 500, 750, 1000, 1250, 1500, 2000), metadata={
        "help": "Steps whose weights are kept under checkpoints/ (the LAL analysis reads them)."})
    eval_samples: int = field(default=600, metadata={"help": "Held-out samples the manifest's accuracy is measured on."})

    def digest(self) -> str:
        return recipe_digest(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> ReferenceRecipe:
        as_tuples = {"levels": tuple, "checkpoint_steps": tuple, "tasks": tuple, "graded_tasks": tuple,
                     "text": lambda v: tuple(tuple(p) for p in v), "vision": lambda v: tuple(tuple(p) for p in v)}
        return cls(**{k: as_tuples[k](v) if k in as_tuples else v for k, v in data.items()})


REFERENCE_RECIPE = ReferenceRecipe()
"""The recipe of the shipped ``tiny-shapes`` (changing it means retraining: the alias refuses the
old weights until ``python -m trainer.reference`` has written new ones)."""


def recipe_digest(recipe: dict) -> str:
    return stable_hash(recipe)


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of a reference-model folder, or None for any other folder."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def verify_reference(folder: str | Path, expected: ReferenceRecipe | None = None) -> dict:
    """The folder's manifest, after checking that its weights and recipe are the recorded ones
    (and the ``expected`` recipe, when given); :class:`ReferenceModelError` otherwise."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    rebuild = f"rebuild it with: python -m trainer.reference --out {folder}"
    if manifest is None:
        raise ReferenceModelError(f"{folder}: no {MANIFEST}; {rebuild}")
    recipe = manifest.get("recipe") or {}
    if recipe_digest(recipe) != manifest.get("recipe_digest"):
        raise ReferenceModelError(f"{folder}: the recipe in {MANIFEST} does not match its recorded digest "
                                  f"(edited by hand?); {rebuild}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ReferenceModelError(f"{folder}: {WEIGHTS} is missing; {rebuild}")
    if weights.stat().st_size < 1024 and weights.read_bytes().startswith(b"version https://git-lfs"):
        raise ReferenceModelError(f"{folder}: {WEIGHTS} is a Git LFS pointer, not the weights: run "
                                  f"`git lfs pull`, or {rebuild}")
    actual = file_sha256(weights)
    if actual != manifest.get("weights_sha256"):
        raise ReferenceModelError(
            f"{folder}: {WEIGHTS} has sha256 {actual[:16]}..., the manifest records "
            f"{str(manifest.get('weights_sha256'))[:16]}... (a partial copy, a Git LFS pointer or other "
            f"weights); {rebuild}")
    if expected is not None and recipe_digest(recipe) != expected.digest():
        changed = sorted(k for k, v in asdict(expected).items() if json.loads(json.dumps(v)) != recipe.get(k))
        raise ReferenceModelError(
            f"{folder}: trained with another recipe than this code's (fields {changed} differ); {rebuild}")
    return manifest


def reference_models_dir() -> Path:
    from pipeline.resources import _resource_dir
    return _resource_dir("pipeline.resources.models", "models")


@cache
def reference_path(alias: str = REFERENCE_ALIAS) -> Path:
    """The shipped folder of ``alias``, checked against this code's recipe (once per process)."""
    if alias != REFERENCE_ALIAS:
        raise ValueError(f"no reference model {alias!r}; shipped: {REFERENCE_ALIAS!r}")
    folder = reference_models_dir() / alias
    verify_reference(folder, REFERENCE_RECIPE)
    return folder


def reference_summary(name_or_path: str | Path) -> dict | None:
    """What a card or report says of a reference model (``tiny-shapes`` or a folder with a
    manifest): name, command, digests, parameters and held-out evaluation; None for any other
    model."""
    folder = reference_path() if str(name_or_path) == REFERENCE_ALIAS else Path(name_or_path)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        return None
    keys = ("name", "command", "recipe", "recipe_digest", "weights_sha256", "parameters", "evaluation", "training")
    return {k: manifest.get(k) for k in keys}
