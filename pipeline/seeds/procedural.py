"""Procedural seed problems with exact answers: geometry, charts, counting, tables.

Each family module (``pipeline.seeds.families.*``) draws one problem on a Pillow canvas and
returns a :class:`Draft`: the image, the question, the exact answer and ``scene`` metadata that
names every element a solution refers to (id, label, kind, bbox, attrs). This module turns drafts
into contract seed records (schemas/seed.schema.json): it optionally converts numeric problems
into multiple choice, encodes the PNG, hashes the id, and streams ``n`` problems for a config.

Determinism: every random choice comes from ``random.Random`` seeded with a string (Python hashes
str seeds with SHA-512, independent of PYTHONHASHSEED), text uses Pillow's bundled font, and PNGs
are written with fixed settings, so the same seed gives byte-identical images and records.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache

from PIL import Image, ImageDraw, ImageFont

from pipeline.ids import sample_id
from pipeline.images import image_record
from pipeline.seeds.config import FAMILIES, SeedsConfig

INK = (25, 25, 25)
BACKGROUND = (255, 255, 255)
PNG_COMPRESS_LEVEL = 1  # 2-3x faster than the default 6 for ~30% larger files
LETTERS = "ABCDEFGH"


@dataclass
class Draft:
    """One drawn problem before it becomes a record."""

    image: Image.Image
    question: str
    answer: float | int | str  # the exact value; for ``options`` problems, the correct option;
    # a str without options is a word answer (answer_type "text", never turned into choices)
    scene: dict
    options: list[str] | None = None  # problems that are inherently multiple choice
    wrong_values: list[float] = field(default_factory=list)  # plausible slips, for choices


@cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font: identical glyphs on every machine with the same Pillow."""
    return ImageFont.load_default(size)


class Canvas:
    """A white square canvas with helpers that return the bbox of what they draw."""

    def __init__(self, size: int):
        self.size = size
        # Palette mode: flat synthetic art needs < 40 colours, and a 1-byte-per-pixel PNG
        # encodes ~8x faster than RGB (adaptive row filters dominate RGB encoding time).
        self.image = Image.new("P", (size, size), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.unit = size / 448  # layouts are designed at 448 px and scale with the canvas

    def px(self, value: float) -> int:
        return max(1, round(value * self.unit))

    def text(
        self,
        xy: tuple[float, float],
        text: str,
        size: float = 15,
        fill=INK,
        anchor: str = "mm",
        max_width: float | None = None,
    ) -> list[float]:
        """Draw ``text`` (shrunk to fit ``max_width`` pixels when given); returns its bbox."""
        px = self.px(size)
        mask, (x0, y0, x1, y1) = glyph_mask(text, px, anchor)
        if max_width and x1 - x0 > max_width and px > 6:
            mask, (x0, y0, x1, y1) = glyph_mask(
                text, max(6, int(px * max_width / (x1 - x0))), anchor
            )
        ink = self.image.palette.getcolor(fill, self.image)
        left, top = round(xy[0]) + x0, round(xy[1]) + y0
        self.image.paste(ink, (left, top), mask)
        return clamp_box((left, top, left + x1 - x0, top + y1 - y0), self.size)


@lru_cache(maxsize=8192)
def glyph_mask(text: str, px: int, anchor: str) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A rendered label as a 1-bit mask plus its box relative to the anchor point.

    Labels repeat constantly (digits, tick values, names), and pasting a cached mask costs about
    a tenth of laying the text out again with ``ImageDraw.text``.
    """
    f = font(px)
    # 1-bit rendering is hinted differently (wider at small sizes) than the anti-aliased default
    # metrics, so measure in mode "1", draw with a margin and keep the box of the ink drawn.
    x0, y0, x1, y1 = f.getbbox(text, mode="1", anchor=anchor)
    pad = 2
    canvas = Image.new("1", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - x0, pad - y0), text, font=f, fill=1, anchor=anchor)
    ink = canvas.getbbox() or (0, 0, 1, 1)
    left, top = ink[0] - pad + x0, ink[1] - pad + y0
    return canvas.crop(ink), (left, top, left + ink[2] - ink[0], top + ink[3] - ink[1])


def clamp_box(box, size: int) -> list[float]:
    x0, y0, x1, y1 = box
    return [
        round(min(max(v, 0.0), size), 1)
        for v in (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    ]


def union(*boxes) -> list[float]:
    return [
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    ]


def point_box(x: float, y: float, r: float, size: int) -> list[float]:
    return clamp_box((x - r, y - r, x + r, y + r), size)


def element(eid: str, label: str, kind: str, bbox, **attrs) -> dict:
    return {
        "id": eid,
        "label": label,
        "kind": kind,
        "bbox": [round(float(v), 1) for v in bbox],
        "attrs": attrs,
    }


def fmt_number(value: float) -> str:
    """Numbers as a person writes them: 70, 2.4 (never 70.0)."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(int(value))


def polar(cx: float, cy: float, radius: float, degrees: float) -> tuple[float, float]:
    """Point at ``degrees`` measured counter-clockwise on screen (y grows downwards)."""
    rad = math.radians(degrees)
    return cx + radius * math.cos(rad), cy - radius * math.sin(rad)


def _choice_values(draft: Draft, rng: random.Random) -> list[str]:
    gold = float(draft.answer)
    pool = [w for w in draft.wrong_values if w > 0 and abs(w - gold) > 1e-9]
    step = 1 if gold < 20 else 5 if gold < 200 else 10
    pool += [gold + k * step for k in (1, -1, 2, -2, 3, 4)]
    values: list[str] = [fmt_number(draft.answer)]
    for v in pool:
        text = fmt_number(round(v, 1) if not float(v).is_integer() else int(v))
        if v > 0 and text not in values:
            values.append(text)
        if len(values) == 4:
            break
    rng.shuffle(values)
    return values


def finalize(
    family: str, draft: Draft, rng: random.Random, difficulty: int, choice_fraction: float
) -> dict:
    """Turn a draft into a seed record (multiple choice for some numeric problems)."""
    question = draft.question
    textual = isinstance(draft.answer, str) and draft.options is None  # a word, never a choice
    if draft.options is not None:
        choices = list(draft.options)
        gold = LETTERS[choices.index(str(draft.answer))]
    elif not textual and rng.random() < choice_fraction:
        choices = _choice_values(draft, rng)
        gold = LETTERS[choices.index(fmt_number(draft.answer))]
    else:
        choices, gold = None, draft.answer if textual else fmt_number(draft.answer)
    if choices is not None:
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        question = f"{question}\nChoices:\n{options}\nAnswer with the letter of the correct option."
    buf = io.BytesIO()
    draft.image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    data = buf.getvalue()
    source = f"procedural/{family}"
    scene = dict(
        draft.scene,
        family=family,
        difficulty=difficulty,
        width=draft.image.width,
        height=draft.image.height,
    )
    return {
        "id": sample_id([data], question, source),
        "images": [image_record(data)],
        "question": question,
        "gold_answer": gold,
        "answer_type": "choice" if choices is not None else "text" if textual else "number",
        "choices": choices,
        "source": source,
        "difficulty": difficulty,
        "scene": scene,
    }


@cache
def family_generator(family: str) -> Callable[[random.Random, int, int], Draft]:
    """``generate(rng, level, size)`` of ``pipeline.seeds.families.<family>``."""
    return importlib.import_module(f"pipeline.seeds.families.{family}").generate


def generate_problem(
    family: str, seed: int, difficulty: int = 3, image_size: int = 448, choice_fraction: float = 0.3
) -> dict:
    """One seed record of ``family``; identical bytes for identical arguments."""
    if family not in FAMILIES:
        raise ValueError(f"family: unknown {family!r}; choose from {list(FAMILIES)}")
    if not 1 <= difficulty <= 5:
        raise ValueError(f"difficulty: must be 1-5, got {difficulty}")
    if not 320 <= image_size <= 1024:
        raise ValueError(f"image_size: must be within 320-1024, got {image_size}")
    rng = random.Random(f"avar-seeds/{family}/{seed}/{difficulty}/{image_size}")
    draft = family_generator(family)(rng, difficulty, image_size)
    return finalize(family, draft, rng, difficulty, choice_fraction)


def problem_plan(config: SeedsConfig, index: int) -> tuple[str, int, int]:
    """(family, per-problem seed, difficulty) of the ``index``-th problem of a run."""
    family = config.families[index % len(config.families)]
    digest = hashlib.sha256(f"{config.seed}/{index}".encode()).digest()
    problem_seed = int.from_bytes(digest[:8], "big")
    span = config.difficulty_max - config.difficulty_min + 1
    difficulty = config.difficulty_min + digest[8] % span
    return family, problem_seed, difficulty


MAX_REDRAWS = 20
MAX_TASK_REDRAWS = 200


def iter_procedural(config: SeedsConfig) -> Iterator[dict]:
    """``config.n`` distinct problems, families round-robin, difficulties spread over the range.

    Easy levels have few possible figures, so a problem identical to an earlier one (same id)
    is redrawn with a derived seed; so is one whose task is not among ``config.tasks``. The set
    of seen ids costs 16 bytes per problem.
    """
    seen: set[bytes] = set()
    wanted = set(config.tasks) if config.tasks else None
    for index in range(config.n or 0):
        family, problem_seed, difficulty = problem_plan(config, index)
        redraws = MAX_REDRAWS if wanted is None else MAX_TASK_REDRAWS
        for redraw in range(redraws):
            record = generate_problem(
                family, problem_seed + redraw, difficulty, config.image_size, config.choice_fraction
            )
            key = bytes.fromhex(record["id"])
            if key not in seen and (wanted is None or record["scene"]["task"] in wanted):
                break
        else:
            if wanted is not None and record["scene"]["task"] not in wanted:
                raise ValueError(f"seeds.tasks: {family} drew no problem of {sorted(wanted)} at difficulty "
                                 f"{difficulty} in {redraws} tries; check the task names")
        seen.add(key)
        yield record
