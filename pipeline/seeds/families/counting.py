"""Counting: coloured shapes on a loose grid, with look-alike distractors.

Tasks: ``count`` shapes of one colour and kind, ``count_color`` (all shapes of a colour, from
level 2) and ``count_difference`` between two kinds (from level 4). Every problem places
distractors on purpose: the same shape in a similar colour (orange next to red, purple next to
blue) and the same colour on another shape. Higher levels add shapes and distractors.
"""

from __future__ import annotations

import math
import random

from pipeline.seeds.procedural import Canvas, Draft, clamp_box, element

COLORS = {
    "red": (215, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (232, 200, 30),
    "green": (50, 150, 70),
    "blue": (45, 95, 215),
    "purple": (135, 65, 185),
}
SIMILAR = {
    "red": "orange",
    "orange": "red",
    "blue": "purple",
    "purple": "blue",
    "yellow": "orange",
    "green": "yellow",
}
SHAPES = ("circle", "square", "triangle", "diamond")
# level: (total shapes, counted shapes, similar-colour distractors, same-colour-other-shape)
LEVELS = {
    1: ((5, 7), (1, 3), (1, 1), (1, 1)),
    2: ((8, 11), (2, 4), (1, 2), (1, 2)),
    3: ((12, 16), (2, 6), (2, 3), (2, 2)),
    4: ((16, 22), (3, 7), (2, 4), (2, 3)),
    5: ((22, 30), (4, 9), (3, 5), (3, 4)),
}
TASKS = {
    1: ["count"],
    2: ["count", "count_color"],
    3: ["count", "count_color"],
    4: ["count", "count_color", "count_difference"],
    5: ["count", "count_difference", "count_color"],
}


def _plural(shape: str) -> str:
    return shape + "s"


def _draw_shape(cv: Canvas, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    outline, width = (60, 60, 60), cv.px(1)
    if shape == "circle":
        cv.draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        cv.draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        cv.draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline, width=width)
    else:
        cv.draw.polygon(
            [(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill, outline=outline, width=width
        )


def _plan(rng: random.Random, level: int, task: str) -> tuple[list, list, dict]:
    """(shapes as (colour, shape, distractor-kind), counted queries, counts per query)."""
    (n_lo, n_hi), (t_lo, t_hi), (s_lo, s_hi), (o_lo, o_hi) = LEVELS[level]
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    items: list[tuple[str, str, str | None]] = []
    n_similar, n_other = rng.randint(s_lo, s_hi), rng.randint(o_lo, o_hi)
    if task == "count_difference":
        color2 = rng.choice([c for c in COLORS if c not in (color, SIMILAR[color])])
        shape2 = rng.choice(SHAPES)
        big = rng.randint(max(t_lo, 2), t_hi)
        small = rng.randint(1, big - 1)
        queries = [{"color": color, "shape": shape}, {"color": color2, "shape": shape2}]
        items += [(color, shape, None)] * big + [(color2, shape2, None)] * small
        items += [(SIMILAR[color], shape, "similar_color")] * n_similar
        items += [
            (color, rng.choice([s for s in SHAPES if s != shape]), "same_color_other_shape")
        ] * n_other
        counts = {0: big, 1: small}
    elif task == "count_color":
        count = rng.randint(t_lo, t_hi)
        queries = [{"color": color, "shape": None}]
        items += [(color, rng.choice(SHAPES), None) for _ in range(count)]
        items += [
            (SIMILAR[color], rng.choice(SHAPES), "similar_color")
            for _ in range(n_similar + n_other)
        ]
        counts = {0: count}
    else:
        count = rng.randint(t_lo, t_hi)
        queries = [{"color": color, "shape": shape}]
        items += [(color, shape, None)] * count
        items += [(SIMILAR[color], shape, "similar_color")] * n_similar
        items += [
            (color, rng.choice([s for s in SHAPES if s != shape]), "same_color_other_shape")
            for _ in range(n_other)
        ]
        counts = {0: count}

    def counted(c: str, s: str) -> bool:
        return any(q["color"] == c and q["shape"] in (None, s) for q in queries)

    fillers = [
        (c, s)
        for c in COLORS
        for s in SHAPES
        if not counted(c, s) and not (task == "count_color" and c == SIMILAR[color])
    ]
    total = max(rng.randint(n_lo, n_hi), len(items))
    items += [(*rng.choice(fillers), None) for _ in range(total - len(items))]
    rng.shuffle(items)
    return items, queries, counts


def _describe_query(q: dict) -> str:
    return f"{q['color']} {_plural(q['shape'])}" if q["shape"] else f"{q['color']} shapes"


def generate(rng: random.Random, level: int, size: int) -> Draft:
    task = rng.choice(TASKS[level])
    items, queries, counts = _plan(rng, level, task)
    n = len(items)
    cols = math.ceil(math.sqrt(n * 1.4))
    rows = math.ceil(n * 1.4 / cols)
    cv = Canvas(size)
    margin = 0.05 * size
    cell = (size - 2 * margin) / max(rows, cols)
    oy = (size - rows * cell) / 2
    cells = rng.sample(range(rows * cols), n)
    elements, counted_ids, distractors = [], {i: [] for i in range(len(queries))}, []
    for k, ((color, shape, why), slot) in enumerate(zip(items, sorted(cells), strict=True)):
        r, c = divmod(slot, cols)
        side = cell * rng.uniform(0.42, 0.66)
        x0 = margin + c * cell + rng.uniform(0.05, 0.95) * (cell - side)
        y0 = oy + r * cell + rng.uniform(0.05, 0.95) * (cell - side)
        box = (x0, y0, x0 + side, y0 + side)
        _draw_shape(cv, shape, box, COLORS[color])
        eid = f"shape_{k:02d}"
        elements.append(
            element(
                eid,
                f"{color} {shape} at row {r + 1}, column {c + 1}",
                "shape",
                clamp_box(box, size),
                color=color,
                shape=shape,
                row=r + 1,
                col=c + 1,
                rgb=list(COLORS[color]),
                distractor=why,
            )
        )
        for i, q in enumerate(queries):
            if q["color"] == color and q["shape"] in (None, shape):
                counted_ids[i].append(eid)
        if why:
            distractors.append(eid)
    if task == "count_difference":
        question = (
            f"How many more {_describe_query(queries[0])} than {_describe_query(queries[1])} "
            f"are there in the picture?"
        )
        answer = counts[0] - counts[1]
        wrong = [
            counts[0],
            counts[0] + sum(1 for it in items if it[2] == "similar_color") - counts[1],
        ]
    else:
        question = f"How many {_describe_query(queries[0])} are there in the picture?"
        answer = counts[0]
        wrong = [answer + sum(1 for it in items if it[2] == "similar_color"), answer + 1]
    scene = {
        "task": task,
        "grid": {"rows": rows, "cols": cols},
        "query": queries,
        "given": [e for ids in counted_ids.values() for e in ids],
        "distractors": distractors,
        "target": {
            "op": task,
            "query": queries,
            "elements": [counted_ids[i] for i in range(len(queries))],
        },
        "elements": elements,
    }
    return Draft(cv.image, question, answer, scene, wrong_values=wrong)
