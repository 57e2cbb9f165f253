"""Charts: bar and line charts with labelled axes and printed values.

Tasks: ``read`` a value, ``max`` (which category is highest; multiple choice), ``difference``
(from level 2), ``sum`` of two (level 3) and ``total`` of a series (level 4). From level 4 a
second series shares the axes: its bar or point for the same category is the distractor.
Bars are drawn exactly to scale: ``scene.axis.px_per_unit`` maps values to pixels.
"""

from __future__ import annotations

import math
import random

from pipeline.seeds.procedural import (
    Canvas,
    Draft,
    clamp_box,
    element,
    point_box,
    union,
)

THEMES = [
    {
        "title": "Fruit boxes sold",
        "y_label": "boxes",
        "metric": "number of boxes sold",
        "categories": ["Apples", "Pears", "Plums", "Kiwis", "Mangos", "Grapes", "Lemons", "Limes"],
    },
    {
        "title": "City visitors (thousands)",
        "y_label": "visitors (k)",
        "metric": "number of visitors in thousands",
        "categories": ["Oslo", "Lima", "Rome", "Cairo", "Delhi", "Tokyo", "Paris", "Quito"],
    },
    {
        "title": "Daily orders",
        "y_label": "orders",
        "metric": "number of orders",
        "categories": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"],
    },
]
SERIES = [("Online", "In store"), ("North", "South"), ("Team A", "Team B")]
COLORS = [(66, 110, 200), (230, 140, 40)]
COLOR_NAMES = ["blue", "orange"]
LEVELS = {
    1: (3, 4, 20, 1),
    2: (4, 5, 50, 1),
    3: (5, 6, 100, 1),
    4: (5, 6, 100, 2),
    5: (6, 7, 300, 2),
}
TASKS = {
    1: ["read", "max"],
    2: ["read", "max", "difference"],
    3: ["read", "difference", "sum", "max"],
    4: ["read", "difference", "sum", "total", "max"],
    5: ["difference", "sum", "total", "max"],
}


def _nice_step(top: float) -> int:
    return next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200) if math.ceil(top / s) <= 6)


def generate(rng: random.Random, level: int, size: int) -> Draft:
    lo, hi, vmax, n_series = LEVELS[level]
    theme = rng.choice(THEMES)
    chart_type = rng.choice(["bar", "line"])
    n = rng.randint(lo, min(hi, len(theme["categories"])))
    picked = set(rng.sample(theme["categories"], n))
    cats = [c for c in theme["categories"] if c in picked]  # weekdays stay in weekday order
    series = list(rng.choice(SERIES)[:n_series]) if n_series == 2 else [""]
    task = rng.choice(TASKS[level])
    focus = rng.randrange(len(series))
    while True:  # distinct values in the focus series keep "which is highest" unambiguous
        values = [[rng.randint(max(1, vmax // 10), vmax) for _ in cats] for _ in series]
        if len(set(values[focus])) == n:
            break
    cv = Canvas(size)
    s = float(size)
    left, right, top, bottom = 0.15 * s, 0.96 * s, 0.17 * s, 0.82 * s
    step = _nice_step(max(max(v) for v in values))
    y_max = math.ceil(max(max(v) for v in values) / step) * step
    ppu = (bottom - top) / y_max
    elements: list[dict] = []
    tbox = cv.text((s / 2, 0.05 * s), theme["title"], size=18)
    elements.append(element("title", "chart title", "title", tbox, text=theme["title"]))
    ybox = [left, top, left, bottom]
    for tick in range(0, y_max + 1, step):
        y = bottom - tick * ppu
        cv.draw.line([(left, y), (right, y)], fill=(225, 225, 225), width=1)
        ybox = union(ybox, cv.text((left - cv.px(6), y), str(tick), size=12, anchor="rm"))
    cv.draw.line([(left, top), (left, bottom), (right, bottom)], fill=(40, 40, 40), width=cv.px(2))
    ybox = union(
        ybox, cv.text((left - cv.px(4), top - cv.px(16)), theme["y_label"], size=13, anchor="lm")
    )
    elements.append(
        element(
            "y_axis", "y axis", "axis", ybox, title=theme["y_label"], min=0, max=y_max, step=step
        )
    )
    group = (right - left) / n
    xbox = [left, bottom, right, bottom]
    for i, cat in enumerate(cats):
        xbox = union(
            xbox,
            cv.text(
                (left + group * (i + 0.5), bottom + cv.px(14)), cat, size=13, max_width=group - 2
            ),
        )
    elements.append(element("x_axis", "x axis", "axis", xbox, categories=cats))
    if n_series == 2:
        x = right - cv.px(170)
        for j, name in enumerate(series):
            sw = (x, 0.1 * s - cv.px(5), x + cv.px(10), 0.1 * s + cv.px(5))
            cv.draw.rectangle(sw, fill=COLORS[j])
            lbox = union(
                clamp_box(sw, size), cv.text((x + cv.px(14), 0.1 * s), name, size=12, anchor="lm")
            )
            elements.append(
                element(
                    f"legend_{j}",
                    f"legend {name}",
                    "legend",
                    lbox,
                    series=name,
                    color=COLOR_NAMES[j],
                )
            )
            x += cv.px(90)
    ids = {}
    for j, name in enumerate(series):
        prefix = f"{name} " if name else ""
        width = group * 0.62 / n_series
        points = []
        for i, cat in enumerate(cats):
            v = values[j][i]
            y = bottom - v * ppu
            if chart_type == "bar":
                x0 = left + group * i + group * 0.19 + width * j
                box = [x0, y, x0 + width, bottom]
                cv.draw.rectangle(box, fill=COLORS[j])
                vbox = cv.text(
                    (x0 + width / 2, y - cv.px(8)), str(v), size=11 if n_series == 2 else 12
                )
                kind, label = "bar", f"{prefix}bar for {cat}"
            else:
                cx = left + group * (i + 0.5)
                points.append((cx, y))
                box = point_box(cx, y, cv.px(4), size)
                # the label goes on the side away from the other series, so the two never collide
                below = n_series == 2 and (
                    v < values[1 - j][i] or (v == values[1 - j][i] and j == 1)
                )
                vbox = cv.text(
                    (cx, y + (cv.px(15) if below else -cv.px(14))), str(v), size=12, fill=COLORS[j]
                )
                kind, label = "point", f"{prefix}point for {cat}"
            eid = f"{kind}_{j}_{i}"
            ids[(j, i)] = eid
            elements.append(
                element(
                    eid,
                    label,
                    kind,
                    box,
                    category=cat,
                    series=name,
                    value=v,
                    color=COLOR_NAMES[j],
                    value_label_bbox=vbox,
                )
            )
        if chart_type == "line":
            cv.draw.line(points, fill=COLORS[j], width=cv.px(2))
            for cx, y in points:
                cv.draw.ellipse(point_box(cx, y, cv.px(4), size), fill=COLORS[j])
    vals = values[focus]
    order = sorted(range(n), key=lambda i: vals[i], reverse=True)
    sp = f" in the {series[focus]} series" if n_series == 2 else ""
    metric = theme["metric"]
    options = None
    if task == "read":
        picks = [rng.randrange(n)]
        answer: int | str = vals[picks[0]]
        question = f"According to the chart, what is the {metric} for {cats[picks[0]]}{sp}?"
    elif task == "difference":
        a, b = sorted(rng.sample(range(n), 2), key=lambda i: -vals[i])
        picks, answer = [a, b], vals[a] - vals[b]
        question = f"How much greater is the {metric} for {cats[a]} than for {cats[b]}{sp}?"
    elif task == "sum":
        picks = sorted(rng.sample(range(n), 2))
        answer = vals[picks[0]] + vals[picks[1]]
        question = f"What is the combined {metric} for {cats[picks[0]]} and {cats[picks[1]]}{sp}?"
    elif task == "total":
        picks, answer = list(range(n)), sum(vals)
        question = f"What is the total {metric} over all {n} categories{sp}?"
    else:
        picks = [order[0]]
        others = rng.sample(order[1:], min(3, n - 1))
        options = [cats[i] for i in sorted([order[0], *others])]
        answer = cats[order[0]]
        question = f"Which category has the highest {metric}{sp}?"
    targets = [ids[(focus, i)] for i in picks]
    if n_series == 2:
        distractors = [ids[(1 - focus, i)] for i in picks]
    else:  # the neighbouring category that is not asked about
        near = [i for i in (picks[0] + 1, picks[0] - 1, *range(n)) if 0 <= i < n and i not in picks]
        distractors = [ids[(focus, near[0])]] if near else []
    if task == "max":
        distractors = [ids[(focus, order[1])]]
    scene = {
        "task": task,
        "chart": {
            "type": chart_type,
            "title": theme["title"],
            "y_label": theme["y_label"],
            "metric": metric,
            "series": series,
            "categories": cats,
        },
        "axis": {
            "y_zero_px": round(bottom, 2),
            "px_per_unit": round(ppu, 4),
            "y_max": y_max,
            "step": step,
        },
        "given": targets,
        "distractors": distractors,
        "distractor_for": targets[0],
        "target": {"op": task, "elements": targets, "series": series[focus]},
        "elements": elements,
    }
    wrong = []
    if task != "max":
        slip = (
            values[1 - focus][picks[0]] if n_series == 2 else vals[(picks[0] + 1) % n]
        )  # a misread
        wrong = [answer - vals[picks[0]] + slip, answer + step]
    return Draft(cv.image, question, answer, scene, options=options, wrong_values=wrong)
