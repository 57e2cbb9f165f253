"""Where seed problems come from: the procedural generator, a local dataset, or the Hub."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.images import DEFAULT_MAX_SOURCE_PIXELS

FAMILIES = ("geometry", "charts", "counting", "tables", "shapes")
DEFAULT_FAMILIES = ("geometry", "charts", "counting", "tables")
SeedKind = Literal["procedural", "local", "hub"]
AnswerTypeMode = Literal["auto", "number", "choice", "text", "expression"]


@dataclass
class SeedsConfig:
    kind: SeedKind = field(
        default="procedural",
        metadata={
            "help": "procedural (built-in generator with exact answers and scene metadata) | local "
            "(a save_to_disk folder, parquet/jsonl/csv files, or an image folder with "
            "metadata.jsonl/csv) | hub (datasets.load_dataset by repo id; needs network)"
        },
    )
    n: int | None = field(
        default=200,
        metadata={
            "help": "Procedural: how many problems to generate. Loaders: at most this many rows "
            "(null = all)."
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Procedural: master seed; the same seed gives byte-identical images and records."
        },
    )
    families: list[str] = field(
        default_factory=lambda: list(DEFAULT_FAMILIES),
        metadata={
            "help": "Procedural: problem families, generated round-robin (geometry, charts, "
            "counting, tables; shapes: the simple scenes the learned reference model tiny-shapes "
            "knows)."
        },
    )
    difficulty_min: int = field(
        default=1, metadata={"help": "Procedural: lowest difficulty level (1-5)."}
    )
    difficulty_max: int = field(
        default=5,
        metadata={
            "help": "Procedural: highest difficulty level (1-5); levels add elements, distractors "
            "and harder arithmetic."
        },
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Procedural: keep only problems of these tasks (scene.task, e.g. [count, "
            "count_color, count_kind] for the shapes questions the reference model tiny-shapes was "
            "trained on); null = every task of the families."
        },
    )
    image_size: int = field(
        default=448, metadata={"help": "Procedural: square canvas side in pixels (320-1024)."}
    )
    choice_fraction: float = field(
        default=0.3,
        metadata={
            "help": "Procedural: share of numeric problems turned into multiple choice "
            "(gold answer a letter)."
        },
    )
    path: str | None = field(
        default=None,
        metadata={
            "help": "Local: dataset folder or file (save_to_disk folder, *.parquet, *.jsonl, *.csv, "
            "or an image folder with metadata.jsonl/metadata.csv)."
        },
    )
    repo_id: str | None = field(
        default=None, metadata={"help": "Hub: dataset repository id, e.g. hiyouga/geometry3k."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Hub/local builder: dataset configuration (subset) name."}
    )
    split: str = field(default="train", metadata={"help": "Dataset split to read."})
    streaming: bool = field(
        default=True,
        metadata={"help": "Hub: stream rows instead of downloading the whole dataset first."},
    )
    source: str | None = field(
        default=None,
        metadata={
            "help": "Name recorded as each seed's source (default: the repo id or the folder name)."
        },
    )
    image_column: str = field(
        default="images",
        metadata={
            "help": "Column with the image(s): HF Image dicts {bytes, path}, paths, raw bytes, or "
            "lists of them. Image folders use 'image' when this column is absent."
        },
    )
    question_column: str = field(
        default="problem", metadata={"help": "Column with the question text."}
    )
    answer_column: str = field(default="answer", metadata={"help": "Column with the gold answer."})
    choices_column: str | None = field(
        default=None,
        metadata={"help": "Optional column with the answer options (list of strings)."},
    )
    difficulty_column: str | None = field(
        default=None, metadata={"help": "Optional column with an integer difficulty 1-5."}
    )
    answer_type: AnswerTypeMode = field(
        default="auto",
        metadata={
            "help": "auto: 'choice' when choices are given and the answer is a letter, 'number' "
            "when it parses as a number, else 'text'; or force one type."
        },
    )
    image_root: str | None = field(
        default=None,
        metadata={
            "help": "Folder that relative image paths are resolved against (default: the dataset "
            "folder)."
        },
    )
    strip_image_tokens: bool = field(
        default=True,
        metadata={
            "help": "Remove '<image>' placeholder tokens from questions (Geometry3K style); the "
            "chat template places images itself."
        },
    )
    max_source_pixels: int = field(
        default=DEFAULT_MAX_SOURCE_PIXELS,
        metadata={
            "help": "Refuse source images with more pixels than this (decompression bombs) as rejects."
        },
    )

    def __post_init__(self):
        if self.n is not None and self.n < 0:
            raise ValueError(f"seeds.n: must be >= 0 or null, got {self.n}")
        if not 1 <= self.difficulty_min <= self.difficulty_max <= 5:
            raise ValueError(
                f"seeds.difficulty_min/difficulty_max: need 1 <= min <= max <= 5, got "
                f"{self.difficulty_min}..{self.difficulty_max}"
            )
        if not 320 <= self.image_size <= 1024:  # below 320 px labels become illegible
            raise ValueError(f"seeds.image_size: must be within 320-1024, got {self.image_size}")
        if not 0.0 <= self.choice_fraction <= 1.0:
            raise ValueError(
                f"seeds.choice_fraction: must be within 0-1, got {self.choice_fraction}"
            )
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(
                f"seeds.families: unknown or empty {unknown or self.families}; "
                f"choose from {list(FAMILIES)}"
            )
        if self.kind == "local" and not self.path:
            raise ValueError("seeds.path: required when seeds.kind is 'local'")
        if self.kind == "hub" and not self.repo_id:
            raise ValueError("seeds.repo_id: required when seeds.kind is 'hub'")
        if self.max_source_pixels < 1:
            raise ValueError(f"seeds.max_source_pixels: must be >= 1, got {self.max_source_pixels}")
        if self.tasks is not None and not self.tasks:
            raise ValueError("seeds.tasks: give at least one task, or null for all")
        if self.kind == "procedural" and self.n is None:
            raise ValueError("seeds.n: procedural generation needs a number of problems")
