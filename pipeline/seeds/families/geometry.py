"""Geometry: labelled figures where an angle or a length follows exactly from the marks.

Tasks: ``triangle_angle`` (angle sum, with an exterior angle from level 2), ``parallel_angle``
(parallel lines cut by a transversal, a non-parallel distractor line from level 4) and
``right_triangle`` (Pythagorean triples, a labelled altitude as distractor from level 4).
Figures are drawn to scale, so what the marks say is what the picture shows.
"""

from __future__ import annotations

import math
import random

from pipeline.seeds.families.figures import LINE, MARK, arc, fit, segment, side_label, vertex_labels
from pipeline.seeds.families.parallel_lines import parallel_angle
from pipeline.seeds.procedural import (
    Canvas,
    Draft,
    clamp_box,
    element,
    fmt_number,
    point_box,
    union,
)

TRIPLES = {
    1: [(3, 4, 5), (6, 8, 10)],
    2: [(3, 4, 5), (6, 8, 10), (5, 12, 13)],
    3: [(5, 12, 13), (8, 15, 17), (6, 8, 10)],
    4: [(8, 15, 17), (7, 24, 25), (20, 21, 29), (12, 16, 20)],
    5: [(7, 24, 25), (20, 21, 29), (12, 35, 37), (9, 12, 15)],
}


def _triangle_angle(rng: random.Random, level: int, size: int) -> Draft:
    step = 10 if level == 1 else 5 if level <= 3 else 1
    while True:
        ang = {"A": rng.randrange(30, 91, step), "B": rng.randrange(30, 91, step)}
        ang["C"] = 180 - ang["A"] - ang["B"]
        if 30 <= ang["C"] <= 105:
            break
    exterior = level >= 2
    ac = math.sin(math.radians(ang["B"])) / math.sin(math.radians(ang["C"]))
    raw = {
        "A": (0.0, 0.0),
        "B": (1.0, 0.0),
        "C": (ac * math.cos(math.radians(ang["A"])), ac * math.sin(math.radians(ang["A"]))),
    }
    if exterior:
        raw["D"] = (1.35, 0.0)
    cv = Canvas(size)
    pts = fit(raw, size, cv.px(70), turn=rng.uniform(-12, 12))
    for p, q in (("A", "B"), ("B", "C"), ("C", "A")):
        segment(cv, pts[p], pts[q])
    if exterior:
        cv.draw.line([pts["B"], pts["D"]], fill=LINE, width=cv.px(2))
    elements: list[dict] = []
    vertex_labels(cv, pts, "ABC", elements)
    given = []
    for v, (p, q) in {"A": ("B", "C"), "B": ("C", "A")}.items():
        if v == "B" and exterior:
            box, _ = arc(cv, pts["B"], pts["D"], pts["C"], f"{180 - ang['B']}°", 30)
            elements.append(
                element(
                    "ext_B",
                    "exterior angle at B",
                    "angle",
                    box,
                    vertex="B",
                    value=180 - ang["B"],
                    exterior=True,
                    rays=["BD", "BC"],
                    marked=f"{180 - ang['B']}°",
                )
            )
            given.append("ext_B")
            continue
        box, _ = arc(cv, pts[v], pts[p], pts[q], f"{ang[v]}°", 30)
        elements.append(
            element(
                f"ang_{v}",
                f"angle {v}",
                "angle",
                box,
                vertex=v,
                value=ang[v],
                exterior=False,
                marked=f"{ang[v]}°",
            )
        )
        given.append(f"ang_{v}")
    box, _ = arc(cv, pts["C"], pts["A"], pts["B"], "?", 26, color=(30, 90, 200))
    elements.append(
        element(
            "ang_C", "angle C", "angle", box, vertex="C", value=None, exterior=False, marked="?"
        )
    )
    centroid = (sum(pts[n][0] for n in "ABC") / 3, sum(pts[n][1] for n in "ABC") / 3)
    distractors = []
    ab = rng.randrange(4, 21)
    sides = {
        "AB": ab,
        "BC": ab * math.sin(math.radians(ang["A"])) / math.sin(math.radians(ang["C"])),
        "CA": ab * math.sin(math.radians(ang["B"])) / math.sin(math.radians(ang["C"])),
    }
    for name in list(sides)[: min(3, max(0, level - 1))]:
        length = round(sides[name], 1)
        box = side_label(
            cv, pts, name[0], name[1], fmt_number(length), centroid, color=(90, 90, 90)
        )
        elements.append(
            element(
                f"side_{name}",
                f"side {name}",
                "length",
                box,
                endpoints=[name[0], name[1]],
                length=length,
            )
        )
        distractors.append(f"side_{name}")
    question = (
        "In the figure, side AB of triangle ABC is extended beyond B. What is the measure "
        "of angle C, in degrees?"
        if exterior
        else "What is the measure of angle C in triangle ABC shown in the figure, in degrees?"
    )
    wrong = [180 - ang["A"] - (180 - ang["B"]), 180 - ang["A"], 90]
    scene = {
        "task": "triangle_angle",
        "triangle": "ABC",
        "given": given,
        "distractors": distractors,
        "target": {"op": "angle", "elements": ["ang_C"]},
        "unit": "degrees",
        "elements": elements,
    }
    return Draft(cv.image, question, ang["C"], scene, wrong_values=wrong)


def _right_triangle(rng: random.Random, level: int, size: int) -> Draft:
    a, b, c = rng.choice(TRIPLES[level])
    k = rng.randrange(1, 3 if level <= 2 else 4)
    a, b, c = a * k, b * k, c * k
    if rng.random() < 0.5:
        a, b = b, a
    find = "hypotenuse" if level == 1 else rng.choice(["hypotenuse", "leg"])
    raw = {"C": (0.0, 0.0), "B": (float(a), 0.0), "A": (0.0, float(b))}
    cv = Canvas(size)
    pts = fit(raw, size, cv.px(75), turn=rng.uniform(-20, 20))
    for p, q in (("A", "B"), ("B", "C"), ("C", "A")):
        segment(cv, pts[p], pts[q])
    elements: list[dict] = []
    vertex_labels(cv, pts, "ABC", elements)
    corner = [pts["C"]]
    for toward in ("B", "A"):  # the little square sits along both legs, whatever the turn
        dx, dy = pts[toward][0] - pts["C"][0], pts[toward][1] - pts["C"][1]
        d = math.hypot(dx, dy)
        corner.append((pts["C"][0] + dx / d * cv.px(16), pts["C"][1] + dy / d * cv.px(16)))
    far = (corner[1][0] + corner[2][0] - corner[0][0], corner[1][1] + corner[2][1] - corner[0][1])
    cv.draw.line([corner[1], far, corner[2]], fill=MARK, width=cv.px(2))
    xs, ys = [p[0] for p in (*corner, far)], [p[1] for p in (*corner, far)]
    elements.append(
        element(
            "right_C",
            "right angle at C",
            "right_angle",
            clamp_box((min(xs), min(ys), max(xs), max(ys)), size),
            vertex="C",
            value=90,
        )
    )
    centroid = (sum(pts[n][0] for n in "ABC") / 3, sum(pts[n][1] for n in "ABC") / 3)
    lengths = {"BC": a, "CA": b, "AB": c}
    target = "AB" if find == "hypotenuse" else rng.choice(["BC", "CA"])
    for name, length in lengths.items():
        shown = "?" if name == target else fmt_number(length)
        box = side_label(
            cv,
            pts,
            name[0],
            name[1],
            shown,
            centroid,
            color=(30, 90, 200) if name == target else LINE,
        )
        elements.append(
            element(
                f"side_{name}",
                f"side {name}",
                "length",
                box,
                endpoints=[name[0], name[1]],
                length=None if name == target else length,
                hypotenuse=name == "AB",
            )
        )
    distractors = []
    if level >= 4:  # the altitude from C: a true, labelled length that answers nothing
        t = (a * a) / (c * c)  # foot D divides BA with BD = a^2 / c
        D = (
            pts["B"][0] + (pts["A"][0] - pts["B"][0]) * t,
            pts["B"][1] + (pts["A"][1] - pts["B"][1]) * t,
        )
        cv.draw.line([pts["C"], D], fill=(110, 110, 110), width=cv.px(2))
        h = round(a * b / c, 1)
        mid = ((pts["C"][0] + D[0]) / 2, (pts["C"][1] + D[1]) / 2)
        box = union(
            cv.text(
                (mid[0] + cv.px(14), mid[1] - cv.px(2)),
                fmt_number(h),
                size=14,
                fill=(110, 110, 110),
            ),
            clamp_box((*pts["C"], *D), size),
        )
        elements.append(
            element(
                "side_CD",
                "segment CD",
                "length",
                box,
                endpoints=["C", "D"],
                length=h,
                altitude=True,
            )
        )
        lx, ly = D[0] + (D[0] - centroid[0]) * 0.15, D[1] + (D[1] - centroid[1]) * 0.15
        elements.append(
            element(
                "pt_D",
                "point D",
                "point",
                union(point_box(*D, cv.px(3), size), cv.text((lx, ly), "D", size=15)),
                name="D",
            )
        )
        distractors.append("side_CD")
    known = [f"side_{n}" for n in lengths if n != target]
    question = f"In right triangle ABC shown in the figure, what is the length of side {target}?"
    answer = lengths[target]
    other_leg = lengths["CA" if target == "BC" else "BC"]
    wrong = (
        [a + b, round(math.hypot(c, other_leg), 1)] if find == "leg" else [a + b, abs(a - b) or 1]
    )
    scene = {
        "task": "right_triangle",
        "right_angle_at": "C",
        "given": known,
        "distractors": distractors,
        "target": {"op": "length", "elements": [f"side_{target}"]},
        "unit": "",
        "elements": elements,
    }
    return Draft(cv.image, question, answer, scene, wrong_values=wrong)


TASKS = {
    "triangle_angle": _triangle_angle,
    "parallel_angle": parallel_angle,
    "right_triangle": _right_triangle,
}


def generate(rng: random.Random, level: int, size: int) -> Draft:
    task = rng.choice(sorted(TASKS))
    return TASKS[task](rng, level, size)
