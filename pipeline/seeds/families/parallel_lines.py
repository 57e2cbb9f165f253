"""Geometry task ``parallel_angle``: parallel lines m and n cut by transversal t.

Angles 1-4 surround P (on m) and 5-8 surround Q (on n), numbered top-left, top-right,
bottom-left, bottom-right. One angle is marked with its value, another is asked for (at the same
intersection on level 1, at the other one from level 2). From level 4 a line k that is NOT
parallel to m crosses t at R with its own marked angle: the distractor.
"""

from __future__ import annotations

import math
import random

from pipeline.seeds.families.figures import LINE, MARK, arc, direction
from pipeline.seeds.procedural import Canvas, Draft, clamp_box, element, point_box, polar, union

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")


def parallel_angle(rng: random.Random, level: int, size: int) -> Draft:
    step = 5 if level <= 2 else 1
    alpha = rng.choice([a for a in range(35, 146, step) if not 78 <= a <= 102])
    cv = Canvas(size)
    s = float(size)
    y_m, y_n, cx = (
        rng.uniform(0.3, 0.4) * s,
        rng.uniform(0.62, 0.7) * s,
        rng.uniform(0.44, 0.56) * s,
    )
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
        cv.draw.line(
            [(ax - cv.px(7), y - cv.px(6)), (ax, y), (ax - cv.px(7), y + cv.px(6))],
            fill=LINE,
            width=cv.px(2),
        )
        box = union(
            cv.text((x1 - cv.px(4), y - cv.px(14)), name, size=17),
            clamp_box((x0, y - 2, x1, y + 2), size),
        )
        elements.append(
            element(
                f"line_{name}", f"line {name}", "line", box, parallel_to="n" if name == "m" else "m"
            )
        )
    cv.draw.line([top, bottom], fill=LINE, width=cv.px(3))
    tbox = cv.text((bottom[0] + cv.px(12), bottom[1] - cv.px(4)), "t", size=17)
    elements.append(
        element(
            "line_t",
            "transversal t",
            "line",
            union(tbox, clamp_box((*top, *bottom), size)),
            transversal=True,
        )
    )
    for name, (x, y) in (("P", P), ("Q", Q)):
        cv.draw.ellipse(point_box(x, y, cv.px(3), size), fill=LINE)
        elements.append(
            element(
                f"pt_{name}",
                f"point {name}",
                "point",
                union(
                    point_box(x, y, cv.px(3), size),
                    cv.text((x - cv.px(14), y + cv.px(13)), name, size=14),
                ),
                name=name,
            )
        )
    values = {
        "top-right": alpha,
        "bottom-left": alpha,
        "top-left": 180 - alpha,
        "bottom-right": 180 - alpha,
    }
    bisector = {
        "top-right": alpha / 2,
        "top-left": (alpha + 180) / 2,
        "bottom-left": 180 + alpha / 2,
        "bottom-right": 270 + alpha / 2,
    }
    ray = {"top-right": (1, 0), "top-left": (-1, 0), "bottom-left": (-1, 0), "bottom-right": (1, 0)}
    numbers = {
        (inter, pos): 1 + 4 * k + j
        for k, inter in enumerate("PQ")
        for j, pos in enumerate(POSITIONS)
    }
    given_key = rng.choice(list(numbers))
    choices = [k for k in numbers if k != given_key and (k[0] == given_key[0]) == (level == 1)]
    target_key = rng.choice(choices)
    for (inter, pos), num in numbers.items():
        vx, vy = P if inter == "P" else Q
        if (inter, pos) in (given_key, target_key):
            up = pos.startswith("top")
            along = (vx + ray[pos][0] * 50, vy)
            trans = (vx + (d[0] if up else -d[0]) * 50, vy + (d[1] if up else -d[1]) * 50)
            color = MARK if (inter, pos) == given_key else (30, 90, 200)
            box, _ = arc(cv, (vx, vy), along, trans, str(num), 22, color=color)
            if (inter, pos) == given_key:  # its number as usual, its value further out
                where = polar(vx, vy, cv.px(64), bisector[pos])
                box = union(box, cv.text(where, f"{values[pos]}°", size=14, fill=color))
        else:
            box = cv.text(
                polar(vx, vy, cv.px(30), bisector[pos]), str(num), size=14, fill=(90, 90, 90)
            )
        elements.append(
            element(
                f"ang_{num}",
                f"angle {num}",
                "angle",
                box,
                intersection=inter,
                position=pos,
                number=num,
                value=values[pos] if (inter, pos) == given_key else None,
            )
        )
    distractors = []
    if level >= 4:  # a line that is NOT parallel to m, with its own marked angle
        R = (
            cx + (half + 0.1 * s / math.sin(math.radians(alpha))) * d[0],
            cy + (half + 0.1 * s / math.sin(math.radians(alpha))) * d[1],
        )
        tilt = rng.choice([-1, 1]) * rng.randrange(14, 26)
        kd = (math.cos(math.radians(tilt)), -math.sin(math.radians(tilt)))
        k0, k1 = (R[0] - s * kd[0], R[1] - s * kd[1]), (R[0] + s * kd[0], R[1] + s * kd[1])
        cv.draw.line([k0, k1], fill=(110, 110, 110), width=cv.px(2))
        kx = 0.1 * s
        ky = min(
            max(R[1] - (kx - R[0]) * math.tan(math.radians(tilt)) - cv.px(14), cv.px(10)),
            s - cv.px(10),
        )
        kbox = cv.text((kx, ky), "k", size=16)
        elements.append(
            element(
                "line_k",
                "line k",
                "line",
                union(kbox, clamp_box((R[0] - 2, R[1] - 2, R[0] + 2, R[1] + 2), size)),
                parallel_to=None,
                tilt_degrees=tilt,
            )
        )
        box, value = arc(
            cv,
            R,
            (R[0] + kd[0] * 50, R[1] + kd[1] * 50),
            (R[0] + d[0] * 50, R[1] + d[1] * 50),
            "",
            20,
            color=(110, 110, 110),
        )
        value = round(value)
        lbox = cv.text(
            polar(R[0], R[1], cv.px(40), direction(R, (R[0] + d[0], R[1] + d[1])) - value / 2),
            f"{value}°",
            size=14,
            fill=(110, 110, 110),
        )
        elements.append(
            element(
                "ang_R",
                "angle at R",
                "angle",
                union(box, lbox),
                intersection="R",
                position="top-right",
                value=value,
                on_line="k",
            )
        )
        elements.append(
            element(
                "pt_R",
                "point R",
                "point",
                union(
                    point_box(*R, cv.px(3), size),
                    cv.text((R[0] - cv.px(14), R[1] - cv.px(4)), "R", size=14),
                ),
                name="R",
            )
        )
        distractors.append("ang_R")
    given_num, target_num = numbers[given_key], numbers[target_key]
    question = (
        f"In the figure, lines m and n are parallel and cut by transversal t. "
        f"What is the measure of angle {target_num}, in degrees?"
    )
    answer = values[target_key[1]]
    scene = {
        "task": "parallel_angle",
        "parallel": ["m", "n"],
        "given": [f"ang_{given_num}"],
        "distractors": distractors,
        "target": {"op": "angle", "elements": [f"ang_{target_num}"]},
        "unit": "degrees",
        "elements": elements,
    }
    return Draft(
        cv.image, question, answer, scene, wrong_values=[180 - answer, values[given_key[1]]]
    )
