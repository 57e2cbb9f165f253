"""Shapes: one to four solid shapes on a 2x2 grid, each in its own cell; the simplest family.

The scenes a tiny model can learn to see on two CPU cores (the learned reference model,
:mod:`pipeline.vlm.reference`, is trained on them): four well-separated colours x three kinds,
at most one shape per cell, no text. Tasks:

* ``color_of``: "What color is the circle?" (the kind appears once in the scene);
* ``shape_of``: "What shape is the red one?" (the colour appears once);
* ``count``: "How many shapes are there?";
* ``color_at``: "What color is the shape at the top left?";
* ``shape_at``: "What shape is at the top left?";
* ``count_color``: "How many red shapes are there?" (0 when none is);
* ``count_kind``: "How many circles are there?".

Levels set how many shapes a scene holds (:data:`LEVELS`). :func:`counterfactual` draws a
scene that answers the same question differently, for the negative controls of the VAS stage
(:mod:`pipeline.vas.controls`): a chain written from it makes visual claims that are wrong for
the real image.
"""

from __future__ import annotations

import random

from pipeline.seeds.procedural import Canvas, Draft, clamp_box, element

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (45, 80, 220), "yellow": (235, 200, 30)}
KINDS = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
LEVELS = {1: (1, 2), 2: (1, 3), 3: (2, 3), 4: (2, 4), 5: (3, 4)}  # shapes per scene (min, max)
TASKS = dict.fromkeys(range(1, 6), ("color_of", "shape_of", "count", "color_at", "shape_at", "count_color",
                                    "count_kind"))
MAX_TRIES = 200


def draw_shape(cv: Canvas, kind: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        cv.draw.ellipse(box, fill=fill)
    elif kind == "square":
        cv.draw.rectangle(box, fill=fill)
    else:
        cv.draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


QUESTIONS = {
    "count": "How many shapes are there?",
    "color_of": "What color is the {kind}?",
    "shape_of": "What shape is the {color} one?",
    "color_at": "What color is the shape at the {cell}?",
    "shape_at": "What shape is at the {cell}?",
    "count_color": "How many {color} shapes are there?",
    "count_kind": "How many {kind}s are there?",
}


def question_of(query: dict) -> str:
    """The question text of a task's query."""
    return QUESTIONS.get(query["task"], QUESTIONS["count"]).format(**query)


def answer_of(query: dict, shapes: list[dict]) -> str | int | None:
    """The answer of ``query`` on ``shapes`` (dicts with cell, color, kind); None when the
    scene does not determine one (the kind or colour is missing or repeated)."""
    task = query["task"]
    if task == "count":
        return len(shapes)
    if task == "count_color":
        return sum(s["color"] == query["color"] for s in shapes)
    if task == "count_kind":
        return sum(s["kind"] == query["kind"] for s in shapes)
    if task in ("color_at", "shape_at"):
        hits = [s for s in shapes if s["cell"] == query["cell"]]
        return (hits[0]["color"] if task == "color_at" else hits[0]["kind"]) if hits else None
    key, want = ("kind", "color") if task == "color_of" else ("color", "kind")
    hits = [s for s in shapes if s[key] == query[key]]
    return hits[0][want] if len(hits) == 1 else None


def draw_layout(rng: random.Random, level: int) -> list[dict]:
    """Shapes on distinct cells (colour and kind drawn independently)."""
    lo, hi = LEVELS[level]
    cells = sorted(rng.sample(range(len(CELLS)), rng.randint(lo, hi)))
    return [{"cell": CELLS[c], "color": rng.choice(list(COLORS)), "kind": rng.choice(KINDS)} for c in cells]


def draw_query(rng: random.Random, level: int, shapes: list[dict]) -> dict | None:
    """A question the layout answers, or None when the drawn task has no answer on it."""
    task = rng.choice(TASKS[level])
    shape = rng.choice(shapes)
    query = {"task": task}
    if task == "color_of":
        query["kind"] = shape["kind"]
    elif task == "shape_of":
        query["color"] = shape["color"]
    elif task in ("color_at", "shape_at"):
        query["cell"] = shape["cell"]
    elif task == "count_color":  # a colour in the scene, or now and then one that is not
        query["color"] = shape["color"] if rng.random() < 0.8 else rng.choice(list(COLORS))
    elif task == "count_kind":
        query["kind"] = shape["kind"] if rng.random() < 0.8 else rng.choice(KINDS)
    return query if answer_of(query, shapes) is not None else None


def render(shapes: list[dict], size: int, rng: random.Random) -> tuple[Canvas, list[dict]]:
    """The scene on a canvas (each shape 55-80% of its cell, placed at random inside it) and
    its scene elements."""
    cv = Canvas(size)
    margin, cell = 0.06 * size, 0.44 * size
    elements = []
    for k, shape in enumerate(shapes):
        row, col = divmod(CELLS.index(shape["cell"]), 2)
        side = cell * rng.uniform(0.55, 0.8)
        x0 = margin + col * cell + rng.uniform(0.0, 1.0) * (cell - side)
        y0 = margin + row * cell + rng.uniform(0.0, 1.0) * (cell - side)
        box = (x0, y0, x0 + side, y0 + side)
        draw_shape(cv, shape["kind"], box, COLORS[shape["color"]])
        elements.append(element(f"shape_{k}", f"{shape['color']} {shape['kind']} at the {shape['cell']}",
                                "shape", clamp_box(box, size), color=shape["color"], shape=shape["kind"],
                                cell=shape["cell"], row=row + 1, col=col + 1, rgb=list(COLORS[shape["color"]])))
    return cv, elements


def scene_of(shapes: list[dict], query: dict, elements: list[dict]) -> dict:
    return {"task": query["task"], "query": query, "grid": {"rows": 2, "cols": 2},
            "target": {"op": query["task"], "query": query, "elements": [e["id"] for e in elements]},
            "given": [e["id"] for e in elements], "distractors": [], "elements": elements}


def generate(rng: random.Random, level: int, size: int) -> Draft:
    for _ in range(MAX_TRIES):
        shapes = draw_layout(rng, level)
        query = draw_query(rng, level, shapes)
        if query is not None:
            break
    else:  # pragma: no cover - every layout answers "count"
        raise RuntimeError("no answerable shapes question drawn")
    cv, elements = render(shapes, size, rng)
    answer = answer_of(query, shapes)
    return Draft(cv.image, question_of(query), answer, scene_of(shapes, query, elements))


def shapes_of(scene: dict) -> list[dict]:
    """The (cell, color, kind) dicts of a scene's elements."""
    return [{"cell": e["attrs"]["cell"], "color": e["attrs"]["color"], "kind": e["attrs"]["shape"]}
            for e in scene["elements"] if e["kind"] == "shape"]


def counterfactual(scene: dict, rng: random.Random) -> dict:
    """A scene with the same question and another answer (its elements; the canvas it is drawn
    on is thrown away). A chain written from it claims what is not in the real image."""
    query, real = scene["query"], shapes_of(scene)
    answer = answer_of(query, real)
    level = next(lvl for lvl, (lo, hi) in sorted(LEVELS.items()) if lo <= len(real) <= hi)
    for _ in range(MAX_TRIES):
        shapes = draw_layout(rng, level)
        if query["task"] in ("color_at", "shape_at") and not any(s["cell"] == query["cell"] for s in shapes):
            continue
        other = answer_of(query, shapes)
        if other is not None and other != answer and shapes != real:
            _, elements = render(shapes, scene.get("width", 448), rng)
            return {**scene, **scene_of(shapes, query, elements)}
    raise ValueError(f"no counterfactual scene for query {query}")
