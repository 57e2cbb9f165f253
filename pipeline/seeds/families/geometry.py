"""Geometry: labelled figures where an angle or a length follows exactly from the marks.

Tasks: ``triangle_angle`` (angle sum, with an exterior angle from level 2), ``parallel_angle``
(parallel lines cut by a transversal, a non-parallel distractor line from level 4) and
``right_triangle`` (Pythagorean triples, a labelled altitude as distractor from level 4).
Figures are drawn to scale, so what the marks say is what the picture shows.
"""

from __future__ import annotations

import math
import random

from pipeline.seeds.procedural import (
    Canvas,
    Draft,
    clamp_box,
    element,
    fmt_number,
    point_box,
    polar,
    union,
)

LINE = (30, 30, 30)
MARK = (200, 40, 40)
TRIPLES = {1: [(3, 4, 5), (6, 8, 10)], 2: [(3, 4, 5), (6, 8, 10), (5, 12, 13)],
           3: [(5, 12, 13), (8, 15, 17), (6, 8, 10)],
           4: [(8, 15, 17), (7, 24, 25), (20, 21, 29), (12, 16, 20)],
           5: [(7, 24, 25), (20, 21, 29), (12, 35, 37), (9, 12, 15)]}
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _direction(v, p) -> float:
    """Counter-clockwise screen angle (degrees) of the ray from ``v`` towards ``p``."""
    return math.degrees(math.atan2(v[1] - p[1], p[0] - v[0])) % 360


def _arc(cv: Canvas, vertex, p1, p2, text: str, radius: float, color=MARK) -> tuple[list, float]:
    """Mark the angle (< 180) between rays vertex->p1 and vertex->p2; returns (bbox, value)."""
    a, b = _direction(vertex, p1), _direction(vertex, p2)
    sweep = (b - a) % 360
    if sweep > 180:
        a, sweep = b, 360 - sweep
    r = cv.px(radius)
    box = (vertex[0] - r, vertex[1] - r, vertex[0] + r, vertex[1] + r)
    cv.draw.arc(box, start=-(a + sweep), end=-a, fill=color, width=cv.px(2))
    lx, ly = polar(vertex[0], vertex[1], r + cv.px(17), a + sweep / 2)
    tbox = cv.text((lx, ly), text, size=14, fill=color)
    return union(clamp_box(box, cv.size), tbox), sweep


def _segment(cv: Canvas, p, q, width: float = 3):
    cv.draw.line([p, q], fill=LINE, width=cv.px(width))


def _fit(points: dict, size: int, margin: float, turn: float = 0.0) -> dict:
    """Rotate math-coordinate points (y up) by ``turn`` degrees, then scale and centre them
    into the canvas (y down). The small random turn keeps figures of equal numbers distinct."""
    c, s = math.cos(math.radians(turn)), math.sin(math.radians(turn))
    points = {k: (x * c - y * s, x * s + y * c) for k, (x, y) in points.items()}
    xs, ys = [p[0] for p in points.values()], [p[1] for p in points.values()]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    scale = (size - 2 * margin) / span
    ox = (size - (max(xs) - min(xs)) * scale) / 2
    oy = (size - (max(ys) - min(ys)) * scale) / 2
    return {k: (ox + (x - min(xs)) * scale, oy + (max(ys) - y) * scale) for k, (x, y) in points.items()}


def _vertex_labels(cv: Canvas, pts: dict, names: str, elements: list) -> None:
    cx = sum(pts[n][0] for n in names) / len(names)
    cy = sum(pts[n][1] for n in names) / len(names)
    for n in names:
        x, y = pts[n]
        d = math.hypot(x - cx, y - cy) or 1
        lx, ly = x + (x - cx) / d * cv.px(18), y + (y - cy) / d * cv.px(18)
        cv.draw.ellipse(point_box(x, y, cv.px(3), cv.size), fill=LINE)
        box = union(cv.text((lx, ly), n, size=17), point_box(x, y, cv.px(3), cv.size))
        elements.append(element(f"pt_{n}", f"point {n}", "point", box, name=n, x=round(x, 1), y=round(y, 1)))


def _side_label(cv: Canvas, pts: dict, a: str, b: str, text: str, centroid, color=LINE) -> list:
    (x0, y0), (x1, y1) = pts[a], pts[b]
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    d = math.hypot(mx - centroid[0], my - centroid[1]) or 1
    lx, ly = mx + (mx - centroid[0]) / d * cv.px(16), my + (my - centroid[1]) / d * cv.px(16)
    return union(cv.text((lx, ly), text, size=15, fill=color), clamp_box((x0, y0, x1, y1), cv.size))


def _triangle_angle(rng: random.Random, level: int, size: int) -> Draft:
    step = 10 if level == 1 else 5 if level <= 3 else 1
    while True:
        ang = {"A": rng.randrange(30, 91, step), "B": rng.randrange(30, 91, step)}
        ang["C"] = 180 - ang["A"] - ang["B"]
        if 30 <= ang["C"] <= 105:
            break
    exterior = level >= 2
    ac = math.sin(math.radians(ang["B"])) / math.sin(math.radians(ang["C"]))
    raw = {"A": (0.0, 0.0), "B": (1.0, 0.0),
           "C": (ac * math.cos(math.radians(ang["A"])), ac * math.sin(math.radians(ang["A"])))}
    if exterior:
        raw["D"] = (1.35, 0.0)
    cv = Canvas(size)
    pts = _fit(raw, size, cv.px(70), turn=rng.uniform(-12, 12))
    for p, q in (("A", "B"), ("B", "C"), ("C", "A")):
        _segment(cv, pts[p], pts[q])
    if exterior:
        cv.draw.line([pts["B"], pts["D"]], fill=LINE, width=cv.px(2))
    elements: list[dict] = []
    _vertex_labels(cv, pts, "ABC", elements)
    given = []
    for v, (p, q) in {"A": ("B", "C"), "B": ("C", "A")}.items():
        if v == "B" and exterior:
            box, _ = _arc(cv, pts["B"], pts["D"], pts["C"], f"{180 - ang['B']}°", 30)
            elements.append(element("ext_B", "exterior angle at B", "angle", box, vertex="B",
                                    value=180 - ang["B"], exterior=True, rays=["BD", "BC"],
                                    marked=f"{180 - ang['B']}°"))
            given.append("ext_B")
            continue
        box, _ = _arc(cv, pts[v], pts[p], pts[q], f"{ang[v]}°", 30)
        elements.append(element(f"ang_{v}", f"angle {v}", "angle", box, vertex=v, value=ang[v],
                                exterior=False, marked=f"{ang[v]}°"))
        given.append(f"ang_{v}")
    box, _ = _arc(cv, pts["C"], pts["A"], pts["B"], "?", 26, color=(30, 90, 200))
    elements.append(element("ang_C", "angle C", "angle", box, vertex="C", value=None,
                            exterior=False, marked="?"))
    centroid = (sum(pts[n][0] for n in "ABC") / 3, sum(pts[n][1] for n in "ABC") / 3)
    distractors = []
    ab = rng.randrange(4, 21)
    sides = {"AB": ab, "BC": ab * math.sin(math.radians(ang["A"])) / math.sin(math.radians(ang["C"])),
             "CA": ab * math.sin(math.radians(ang["B"])) / math.sin(math.radians(ang["C"]))}
    for name in list(sides)[:min(3, max(0, level - 1))]:
        length = round(sides[name], 1)
        box = _side_label(cv, pts, name[0], name[1], fmt_number(length), centroid, color=(90, 90, 90))
        elements.append(element(f"side_{name}", f"side {name}", "length", box,
                                endpoints=[name[0], name[1]], length=length))
        distractors.append(f"side_{name}")
    question = ("In the figure, side AB of triangle ABC is extended beyond B. What is the measure "
                "of angle C, in degrees?" if exterior else
                "What is the measure of angle C in triangle ABC shown in the figure, in degrees?")
    wrong = [180 - ang["A"] - (180 - ang["B"]), 180 - ang["A"], 90]
    scene = {"task": "triangle_angle", "triangle": "ABC", "given": given, "distractors": distractors,
             "target": {"op": "angle", "elements": ["ang_C"]}, "unit": "degrees", "elements": elements}
    return Draft(cv.image, question, ang["C"], scene, wrong_values=wrong)


def _parallel_angle(rng: random.Random, level: int, size: int) -> Draft:
    step = 5 if level <= 2 else 1
    alpha = rng.choice([a for a in range(35, 146, step) if not 78 <= a <= 102])
    cv = Canvas(size)
    s = float(size)
    y_m, y_n, cx = rng.uniform(0.3, 0.4) * s, rng.uniform(0.62, 0.7) * s, rng.uniform(0.44, 0.56) * s
    d = (math.cos(math.radians(alpha)), -math.sin(math.radians(alpha)))
    half = (y_n - y_m) / 2 / math.sin(math.radians(alpha))
    cy = (y_m + y_n) / 2
    P, Q = (cx + half * d[0], cy + half * d[1]), (cx - half * d[0], cy - half * d[1])
    reach = half + 0.2 * s / math.sin(math.radians(alpha))
    top, bottom = (cx + reach * d[0], cy + reach * d[1]), (cx - reach * d[0], cy - reach * d[1])
    x0, x1 = 0.07 * s, 0.93 * s
    elements: list[dict] = []
    for name, y in (("m", y_m), ("n", y_n)):
        cv.draw.line([(x0, y), (x1, y)], fill=LINE, width=cv.px(3))
        ax = x1 - cv.px(40)  # the ">" marks that say "parallel"
        cv.draw.line([(ax - cv.px(7), y - cv.px(6)), (ax, y), (ax - cv.px(7), y + cv.px(6))], fill=LINE, width=cv.px(2))
        box = union(cv.text((x1 - cv.px(4), y - cv.px(14)), name, size=17), clamp_box((x0, y - 2, x1, y + 2), size))
        elements.append(element(f"line_{name}", f"line {name}", "line", box, parallel_to="n" if name == "m" else "m"))
    cv.draw.line([top, bottom], fill=LINE, width=cv.px(3))
    tbox = cv.text((bottom[0] + cv.px(12), bottom[1] - cv.px(4)), "t", size=17)
    elements.append(element("line_t", "transversal t", "line", union(tbox, clamp_box((*top, *bottom), size)), transversal=True))
    for name, (x, y) in (("P", P), ("Q", Q)):
        cv.draw.ellipse(point_box(x, y, cv.px(3), size), fill=LINE)
        elements.append(element(f"pt_{name}", f"point {name}", "point",
                                union(point_box(x, y, cv.px(3), size), cv.text((x - cv.px(14), y + cv.px(13)), name, size=14)), name=name))
    values = {"top-right": alpha, "bottom-left": alpha, "top-left": 180 - alpha, "bottom-right": 180 - alpha}
    bisector = {"top-right": alpha / 2, "top-left": (alpha + 180) / 2, "bottom-left": 180 + alpha / 2,
                "bottom-right": 270 + alpha / 2}
    ray = {"top-right": (1, 0), "top-left": (-1, 0), "bottom-left": (-1, 0), "bottom-right": (1, 0)}
    numbers = {(inter, pos): 1 + 4 * k + j for k, inter in enumerate("PQ") for j, pos in enumerate(POSITIONS)}
    given_key = rng.choice(list(numbers))
    choices = [k for k in numbers if k != given_key and (k[0] == given_key[0]) == (level == 1)]
    target_key = rng.choice(choices)
    for (inter, pos), num in numbers.items():
        vx, vy = P if inter == "P" else Q
        if (inter, pos) in (given_key, target_key):
            up = pos.startswith("top")
            along = (vx + ray[pos][0] * 50, vy)
            trans = (vx + (d[0] if up else -d[0]) * 50, vy + (d[1] if up else -d[1]) * 50)
            text = f"{values[pos]}°" if (inter, pos) == given_key else str(num)
            color = MARK if (inter, pos) == given_key else (30, 90, 200)
            box, _ = _arc(cv, (vx, vy), along, trans, text, 22, color=color)
        else:
            box = cv.text(polar(vx, vy, cv.px(30), bisector[pos]), str(num), size=14, fill=(90, 90, 90))
        elements.append(element(f"ang_{num}", f"angle {num}", "angle", box, intersection=inter,
                                position=pos, number=num,
                                value=values[pos] if (inter, pos) == given_key else None))
    distractors = []
    if level >= 4:  # a line that is NOT parallel to m, with its own marked angle
        R = (cx + (half + 0.1 * s / math.sin(math.radians(alpha))) * d[0], cy + (half + 0.1 * s / math.sin(math.radians(alpha))) * d[1])
        tilt = rng.choice([-1, 1]) * rng.randrange(14, 26)
        kd = (math.cos(math.radians(tilt)), -math.sin(math.radians(tilt)))
        k0, k1 = (R[0] - s * kd[0], R[1] - s * kd[1]), (R[0] + s * kd[0], R[1] + s * kd[1])
        cv.draw.line([k0, k1], fill=(110, 110, 110), width=cv.px(2))
        kx = 0.1 * s
        ky = min(max(R[1] - (kx - R[0]) * math.tan(math.radians(tilt)) - cv.px(14), cv.px(10)), s - cv.px(10))
        kbox = cv.text((kx, ky), "k", size=16)
        elements.append(element("line_k", "line k", "line", union(kbox, clamp_box((R[0] - 2, R[1] - 2, R[0] + 2, R[1] + 2), size)),
                                parallel_to=None, tilt_degrees=tilt))
        box, value = _arc(cv, R, (R[0] + kd[0] * 50, R[1] + kd[1] * 50), (R[0] + d[0] * 50, R[1] + d[1] * 50), "", 20, color=(110, 110, 110))
        value = round(value)
        lbox = cv.text(polar(R[0], R[1], cv.px(40), _direction(R, (R[0] + d[0], R[1] + d[1])) - value / 2), f"{value}°", size=14, fill=(110, 110, 110))
        elements.append(element("ang_R", "angle at R", "angle", union(box, lbox), intersection="R",
                                position="top-right", value=value, on_line="k"))
        elements.append(element("pt_R", "point R", "point", union(point_box(*R, cv.px(3), size), cv.text((R[0] - cv.px(14), R[1] - cv.px(4)), "R", size=14)), name="R"))
        distractors.append("ang_R")
    given_num, target_num = numbers[given_key], numbers[target_key]
    question = (f"In the figure, lines m and n are parallel and cut by transversal t. "
                f"What is the measure of angle {target_num}, in degrees?")
    answer = values[target_key[1]]
    scene = {"task": "parallel_angle", "parallel": ["m", "n"], "given": [f"ang_{given_num}"],
             "distractors": distractors, "target": {"op": "angle", "elements": [f"ang_{target_num}"]},
             "unit": "degrees", "elements": elements}
    return Draft(cv.image, question, answer, scene, wrong_values=[180 - answer, values[given_key[1]]])


def _right_triangle(rng: random.Random, level: int, size: int) -> Draft:
    a, b, c = rng.choice(TRIPLES[level])
    k = rng.randrange(1, 3 if level <= 2 else 4)
    a, b, c = a * k, b * k, c * k
    if rng.random() < 0.5:
        a, b = b, a
    find = "hypotenuse" if level == 1 else rng.choice(["hypotenuse", "leg"])
    raw = {"C": (0.0, 0.0), "B": (float(a), 0.0), "A": (0.0, float(b))}
    cv = Canvas(size)
    pts = _fit(raw, size, cv.px(75), turn=rng.uniform(-20, 20))
    for p, q in (("A", "B"), ("B", "C"), ("C", "A")):
        _segment(cv, pts[p], pts[q])
    elements: list[dict] = []
    _vertex_labels(cv, pts, "ABC", elements)
    corner = [pts["C"]]
    for toward in ("B", "A"):  # the little square sits along both legs, whatever the turn
        dx, dy = pts[toward][0] - pts["C"][0], pts[toward][1] - pts["C"][1]
        d = math.hypot(dx, dy)
        corner.append((pts["C"][0] + dx / d * cv.px(16), pts["C"][1] + dy / d * cv.px(16)))
    far = (corner[1][0] + corner[2][0] - corner[0][0], corner[1][1] + corner[2][1] - corner[0][1])
    cv.draw.line([corner[1], far, corner[2]], fill=MARK, width=cv.px(2))
    xs, ys = [p[0] for p in (*corner, far)], [p[1] for p in (*corner, far)]
    elements.append(element("right_C", "right angle at C", "right_angle",
                            clamp_box((min(xs), min(ys), max(xs), max(ys)), size), vertex="C", value=90))
    centroid = (sum(pts[n][0] for n in "ABC") / 3, sum(pts[n][1] for n in "ABC") / 3)
    lengths = {"BC": a, "CA": b, "AB": c}
    target = "AB" if find == "hypotenuse" else rng.choice(["BC", "CA"])
    for name, length in lengths.items():
        shown = "?" if name == target else fmt_number(length)
        box = _side_label(cv, pts, name[0], name[1], shown, centroid,
                          color=(30, 90, 200) if name == target else LINE)
        elements.append(element(f"side_{name}", f"side {name}", "length", box, endpoints=[name[0], name[1]],
                                length=None if name == target else length, hypotenuse=name == "AB"))
    distractors = []
    if level >= 4:  # the altitude from C: a true, labelled length that answers nothing
        t = (a * a) / (c * c)  # foot D divides BA with BD = a^2 / c
        D = (pts["B"][0] + (pts["A"][0] - pts["B"][0]) * t, pts["B"][1] + (pts["A"][1] - pts["B"][1]) * t)
        cv.draw.line([pts["C"], D], fill=(110, 110, 110), width=cv.px(2))
        h = round(a * b / c, 1)
        mid = ((pts["C"][0] + D[0]) / 2, (pts["C"][1] + D[1]) / 2)
        box = union(cv.text((mid[0] + cv.px(14), mid[1] - cv.px(2)), fmt_number(h), size=14, fill=(110, 110, 110)),
                    clamp_box((*pts["C"], *D), size))
        elements.append(element("side_CD", "segment CD", "length", box, endpoints=["C", "D"], length=h,
                                altitude=True))
        lx, ly = D[0] + (D[0] - centroid[0]) * 0.15, D[1] + (D[1] - centroid[1]) * 0.15
        elements.append(element("pt_D", "point D", "point", union(point_box(*D, cv.px(3), size), cv.text((lx, ly), "D", size=15)), name="D"))
        distractors.append("side_CD")
    known = [f"side_{n}" for n in lengths if n != target]
    question = f"In right triangle ABC shown in the figure, what is the length of side {target}?"
    answer = lengths[target]
    other_leg = lengths["CA" if target == "BC" else "BC"]
    wrong = [a + b, round(math.hypot(c, other_leg), 1)] if find == "leg" else [a + b, abs(a - b) or 1]
    scene = {"task": "right_triangle", "right_angle_at": "C", "given": known,
             "distractors": distractors, "target": {"op": "length", "elements": [f"side_{target}"]},
             "unit": "", "elements": elements}
    return Draft(cv.image, question, answer, scene, wrong_values=wrong)


TASKS = {"triangle_angle": _triangle_angle, "parallel_angle": _parallel_angle, "right_triangle": _right_triangle}


def generate(rng: random.Random, level: int, size: int) -> Draft:
    task = rng.choice(sorted(TASKS))
    return TASKS[task](rng, level, size)
