"""Dataset intake shared by ``trainer.sft``, ``trainer.rl`` and ``trainer.eval``.

Three views over one table:
- :func:`sft_dataset`: ``images`` + ``messages`` (user turn with image placeholders, assistant turn
  with the response), what TRL's vision collator consumes;
- :func:`rl_dataset`: ``images`` + ``prompt`` (the conversation without the assistant turn) plus
  the columns the rewards read (``answer``, ``answer_type``, ``choices``);
- :func:`eval_examples`: benchmark rows (MathVista-style column names accepted).

A malformed row raises :class:`DataError` naming the row id and the field; nothing is dropped
silently. The user-turn text of rows without ``messages`` comes from ``prompts/trainer_question.j2``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from pipeline.images import ImageError, image_cell, open_image
from pipeline.questions import question_text
from pipeline.vlm.inputs import with_system_prompt

IMAGE_COLUMNS = ("images", "image", "decoded_image")
QUESTION_COLUMNS = ("problem", "question", "query")
ROLES = ("system", "user", "assistant")
TOY_ALIAS = "toy"


class DataError(ValueError):
    """A row cannot be used. ``row_id`` and ``field`` say which and where."""

    def __init__(self, row_id: str, field_name: str, message: str):
        self.row_id, self.field, self.message = row_id, field_name, message
        super().__init__(f"row {row_id}: field {field_name}: {message}")


def load_table(source: str, split: str = "train", config: str | None = None,
               max_samples: int | None = None) -> datasets.Dataset:
    """Load a dataset from a ``save_to_disk`` folder, a folder of data files, or a Hub id.

    ``toy`` names the drawn-shapes table of :func:`toy_table` (smoke runs without data).
    """
    path = Path(source)
    if source == TOY_ALIAS:
        loaded = toy_table(max_samples or 16, seed=0 if split == "train" else 1)
    elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source}: no split {split!r}; available: {sorted(loaded)}")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(source, name=config, split=split)
    if max_samples is not None:
        loaded = loaded.select(range(min(max_samples, len(loaded))))
    if len(loaded) == 0:
        raise ValueError(f"{source} (split {split!r}) has no rows")
    return loaded


def row_id(row: dict, index: int | None = None) -> str:
    for key in ("id", "pid", "sample_id"):
        if row.get(key) not in (None, ""):
            return str(row[key])
    return f"#{index}" if index is not None else "<no id>"


def _to_image(value: Any, rid: str, where: str) -> Image.Image:
    try:
        image = value if isinstance(value, Image.Image) else open_image(image_cell(value)[0])
    except ImageError as err:
        raise DataError(rid, where, f"not a usable image: {err.message}") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def row_images(row: dict, rid: str) -> list[Image.Image]:
    """The row's images as RGB PIL images (``images`` list, or one ``image``/``decoded_image``)."""
    for column in IMAGE_COLUMNS:
        value = row.get(column)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        return [_to_image(v, rid, f"{column}[{i}]") for i, v in enumerate(values)]
    return []


def row_question(row: dict, rid: str) -> str:
    for column in QUESTION_COLUMNS:
        if isinstance(row.get(column), str) and row[column].strip():
            return row[column]
    raise DataError(rid, "/".join(QUESTION_COLUMNS), "no question text")


def row_choices(row: dict) -> list[str] | None:
    choices = row.get("choices")
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            return None
    return [str(c) for c in choices] if choices else None


def normalize_messages(messages: list[dict], n_images: int, rid: str) -> list[dict]:
    """Structured content blocks with the null keys Arrow adds removed; placeholders must match images.

    Arrow stores content blocks as structs with the union of their keys, so an image placeholder
    comes back as ``{"type": "image", "text": None, "image": None}``; TRL counts a block as an
    unfilled placeholder only when it has no ``image`` key, so the null keys are dropped here.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(rid, "messages", "must be a non-empty list of turns")
    out, placeholders = [], 0
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise DataError(rid, f"messages[{i}].role", f"expected one of {ROLES}, got {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise DataError(rid, f"messages[{i}].content", "must be a string or a list of blocks")
        blocks = []
        for j, block in enumerate(content):
            block = {k: v for k, v in (block or {}).items() if v is not None}
            if block.get("type") == "image":
                placeholders += "image" not in block
            elif block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise DataError(rid, f"messages[{i}].content[{j}]", f"unsupported block {block}")
            blocks.append(block)
        out.append({"role": role, "content": blocks})
    has_string_user = any(m["role"] == "user" and isinstance(m["content"], str) for m in out)
    if placeholders and placeholders != n_images:
        raise DataError(rid, "messages", f"{placeholders} image placeholders for {n_images} images")
    if not placeholders and n_images and not has_string_user:
        raise DataError(rid, "messages", f"no image placeholder for {n_images} images")
    return out


def _sft_row(row: dict, index: int, system_prompt: str | None = None, folded: bool = False) -> dict:
    rid = row_id(row, index)
    images = row_images(row, rid)
    if row.get("messages"):
        messages = normalize_messages(row["messages"], len(images), rid)
        if messages[-1]["role"] != "assistant":
            raise DataError(rid, "messages", "last turn must be the assistant's response")
    else:
        response = row.get("response")
        if not isinstance(response, str) or not response.strip():
            raise DataError(rid, "response", "missing (and no messages column to train on)")
        user = question_text(row_question(row, rid), row_choices(row), format_hint=True)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    messages = _with_system(messages, system_prompt, folded, rid)
    return {"id": rid, "images": images, "messages": with_image_placeholders(messages, len(images))}


def _with_system(messages: list[dict], system_prompt: str | None, folded: bool, rid: str) -> list[dict]:
    """The row's messages with an explicit system turn (its own, else ``system_prompt``)."""
    if system_prompt is None:
        return messages
    try:
        return with_system_prompt(messages, system_prompt, folded=folded)
    except ValueError as err:
        raise DataError(rid, "messages[0].content", str(err)) from None


def with_image_placeholders(messages: list[dict], n_images: int) -> list[dict]:
    """Structured form with image placeholders before the first user text (TRL's convention)."""
    out, placed = [], False
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            blocks = [{"type": "text", "text": content}]
            if message["role"] == "user" and not placed:
                blocks = [{"type": "image"} for _ in range(n_images)] + blocks
                placed = True
            content = blocks
        placed = placed or any(b.get("type") == "image" for b in content)
        out.append({"role": message["role"], "content": content})
    return out


def sft_dataset(table: datasets.Dataset, num_proc: int | None = None, system_prompt: str | None = None,
                folded: bool = False) -> datasets.Dataset:
    """``id``, ``images`` and structured ``messages`` per row (validated here, once).

    Rows without a system turn get ``system_prompt`` as an explicit one (when given; ``folded``
    for families whose template folds it into the first user turn, see
    :func:`pipeline.vlm.inputs.with_system_prompt`). Arrow gives the content blocks back with
    null keys; :func:`strip_nulls` (called by the trainers' collators) removes them again.
    """
    keep = ["id", "images", "messages"]
    return table.map(_sft_row, with_indices=True, num_proc=num_proc,
                     fn_kwargs={"system_prompt": system_prompt, "folded": folded},
                     remove_columns=[c for c in table.column_names if c not in keep], desc="sft view")


def strip_nulls(messages: list[dict]) -> list[dict]:
    """Drop the null keys Arrow adds to content blocks (TRL treats ``image: None`` as a filled image)."""
    return [{**m, "content": [{k: v for k, v in b.items() if v is not None} for b in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]


def _rl_row(row: dict, index: int, system_prompt: str | None = None, folded: bool = False) -> dict:
    rid = row_id(row, index)
    images = row_images(row, rid)
    if row.get("messages"):
        messages = normalize_messages(row["messages"], len(images), rid)
        prompt = [m for m in messages if m["role"] != "assistant"]
    else:
        prompt = [{"role": "user", "content": question_text(row_question(row, rid), row_choices(row), format_hint=True)}]
    answer = row.get("answer")
    if answer is None or str(answer).strip() == "":
        raise DataError(rid, "answer", "missing gold answer (r_acc needs it)")
    prompt = with_image_placeholders(_with_system(prompt, system_prompt, folded, rid), len(images))
    return {"id": rid, "images": images, "prompt": prompt, "answer": str(answer),
            "answer_type": eval_answer_type(row, row_choices(row)), "choices": row_choices(row)}


def rl_dataset(table: datasets.Dataset, num_proc: int | None = None, system_prompt: str | None = None,
               folded: bool = False) -> datasets.Dataset:
    """GRPO prompts: ``prompt`` (conversation without the answer, with an explicit system turn
    as in :func:`sft_dataset`) and the reward columns.

    GRPOTrainer has no collator hook, so the Arrow null keys are stripped on access
    (``with_transform``).
    """
    keep = ["id", "images", "prompt", "answer", "answer_type", "choices"]
    mapped = table.map(_rl_row, with_indices=True, num_proc=num_proc,
                       fn_kwargs={"system_prompt": system_prompt, "folded": folded},
                       remove_columns=[c for c in table.column_names if c not in keep], desc="rl view")
    return mapped.with_transform(_strip_prompt_nulls)


def _strip_prompt_nulls(batch: dict) -> dict:
    batch = dict(batch)
    if "prompt" in batch:
        batch["prompt"] = [strip_nulls(p) for p in batch["prompt"]]
    return batch


@dataclass
class EvalExample:
    id: str
    images: list[Image.Image]
    prompt: str  # the user-turn text, as the model sees it
    answer: str
    answer_type: str | None = None
    choices: list[str] | None = None
    extra: dict = field(default_factory=dict)

    def messages(self, system_prompt: str | None = None, folded: bool = False) -> list[dict]:
        turns = [{"role": "user", "content": [*({"type": "image"} for _ in self.images),
                                              {"type": "text", "text": self.prompt}]}]
        return with_system_prompt(turns, system_prompt, folded=folded) if system_prompt else turns


def _user_text(messages: list[dict]) -> str:
    for message in messages:
        if message["role"] == "user":
            content = message["content"]
            return content if isinstance(content, str) else "".join(
                b.get("text") or "" for b in content if b.get("type") == "text")
    return ""


def eval_answer_type(row: dict, choices: list[str] | None) -> str:
    """Our comparison kind (pipeline.verify) from AVAR or MathVista-style columns."""
    kind = (row.get("answer_type") or "").lower()
    if row.get("question_type") == "multi_choice" or kind == "choice" or (choices and kind in ("", "text")):
        return "choice"
    if kind in ("integer", "float", "number"):
        return "number"
    return kind if kind in ("expression", "text") else "text"


def eval_examples(table: datasets.Dataset, format_hint: bool = True) -> list[EvalExample]:
    """Benchmark rows: images/image/decoded_image, answer, answer_type, choices and the question from
    ``messages`` (AVAR test splits), ``query`` (MathVista: choices and hints already inside) or
    ``question``/``problem`` (+ choices rendered by prompts/trainer_question.j2)."""
    out = []
    for index, row in enumerate(table):
        rid = row_id(row, index)
        if row.get("answer") is None or str(row["answer"]).strip() == "":
            raise DataError(rid, "answer", "missing gold answer")
        images = row_images(row, rid)
        choices = row_choices(row)
        if row.get("messages"):
            prompt = _user_text(normalize_messages(row["messages"], len(images), rid))
        elif isinstance(row.get("query"), str) and row["query"].strip():
            prompt = question_text(row["query"], None, format_hint=format_hint)
        else:
            prompt = question_text(row_question(row, rid), choices, format_hint=format_hint)
        if not prompt.strip():
            raise DataError(rid, "messages", "no user text")
        out.append(EvalExample(id=rid, images=images, prompt=prompt, answer=str(row["answer"]),
                               answer_type=eval_answer_type(row, choices), choices=choices,
                               extra={k: row[k] for k in ("source", "category", "task") if row.get(k)}))
    return out


TOY_COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 20)}
TOY_SHAPES = ("square", "circle", "triangle")


def toy_table(n: int = 8, seed: int = 0, size: int = 56) -> datasets.Dataset:
    """A small table in the published layout: one drawn shape per image, question about its colour.

    For smoke runs and tests of the trainers (the answers are checkable, so r_acc is meaningful).
    """
    import random

    from PIL import ImageDraw

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        color, shape = rng.choice(sorted(TOY_COLORS)), rng.choice(TOY_SHAPES)
        image = Image.new("RGB", (size, size), (245, 245, 245))
        draw, box = ImageDraw.Draw(image), (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        if shape == "square":
            draw.rectangle(box, fill=TOY_COLORS[color])
        elif shape == "circle":
            draw.ellipse(box, fill=TOY_COLORS[color])
        else:
            draw.polygon([(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)],
                         fill=TOY_COLORS[color])
        problem = f"What color is the {shape} in the image?"
        response = (f"<think>Look at the image: there is one {shape}. Checking the image again, its fill "
                    f"is {color}.</think><answer>{color}</answer>")
        rows.append({"id": f"toy-{seed}-{i}", "images": [image], "problem": problem, "answer": color,
                     "answer_type": "text", "response": response, "source": "toy",
                     "messages": with_image_placeholders([
                         {"role": "user", "content": question_text(problem, format_hint=True)},
                         {"role": "assistant", "content": response}], 1)})
    features = datasets.Features({
        "id": datasets.Value("string"), "images": datasets.Sequence(datasets.Image()),
        "problem": datasets.Value("string"), "answer": datasets.Value("string"),
        "answer_type": datasets.Value("string"), "response": datasets.Value("string"),
        "source": datasets.Value("string"),
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
    })
    return datasets.Dataset.from_list(rows, features=features)
