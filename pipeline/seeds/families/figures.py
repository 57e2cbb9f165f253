"""Drawing helpers shared by the geometry figures: fitting points to the canvas, angle arcs,
vertex and side labels. Angles are measured counter-clockwise on screen (y grows downwards)."""

from __future__ import annotations

import math

from pipeline.seeds.procedural import Canvas, clamp_box, element, point_box, polar, union

LINE = (30, 30, 30)
MARK = (200, 40, 40)


def direction(v, p) -> float:
    """Counter-clockwise screen angle (degrees) of the ray from ``v`` towards ``p``."""
    return math.degrees(math.atan2(v[1] - p[1], p[0] - v[0])) % 360


def arc(cv: Canvas, vertex, p1, p2, text: str, radius: float, color=MARK) -> tuple[list, float]:
    """Mark the angle (< 180) between rays vertex->p1 and vertex->p2; returns (bbox, value)."""
    a, b = direction(vertex, p1), direction(vertex, p2)
    sweep = (b - a) % 360
    if sweep > 180:
        a, sweep = b, 360 - sweep
    r = cv.px(radius)
    box = (vertex[0] - r, vertex[1] - r, vertex[0] + r, vertex[1] + r)
    cv.draw.arc(box, start=-(a + sweep), end=-a, fill=color, width=cv.px(2))
    lx, ly = polar(vertex[0], vertex[1], r + cv.px(17), a + sweep / 2)
    tbox = cv.text((lx, ly), text, size=14, fill=color)
    return union(clamp_box(box, cv.size), tbox), sweep


def segment(cv: Canvas, p, q, width: float = 3):
    cv.draw.line([p, q], fill=LINE, width=cv.px(width))


def fit(points: dict, size: int, margin: float, turn: float = 0.0) -> dict:
    """Rotate math-coordinate points (y up) by ``turn`` degrees, then scale and centre them
    into the canvas (y down). The small random turn keeps figures of equal numbers distinct."""
    c, s = math.cos(math.radians(turn)), math.sin(math.radians(turn))
    points = {k: (x * c - y * s, x * s + y * c) for k, (x, y) in points.items()}
    xs, ys = [p[0] for p in points.values()], [p[1] for p in points.values()]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    scale = (size - 2 * margin) / span
    ox = (size - (max(xs) - min(xs)) * scale) / 2
    oy = (size - (max(ys) - min(ys)) * scale) / 2
    return {
        k: (ox + (x - min(xs)) * scale, oy + (max(ys) - y) * scale) for k, (x, y) in points.items()
    }


def vertex_labels(cv: Canvas, pts: dict, names: str, elements: list) -> None:
    cx = sum(pts[n][0] for n in names) / len(names)
    cy = sum(pts[n][1] for n in names) / len(names)
    for n in names:
        x, y = pts[n]
        d = math.hypot(x - cx, y - cy) or 1
        lx, ly = x + (x - cx) / d * cv.px(18), y + (y - cy) / d * cv.px(18)
        cv.draw.ellipse(point_box(x, y, cv.px(3), cv.size), fill=LINE)
        box = union(cv.text((lx, ly), n, size=17), point_box(x, y, cv.px(3), cv.size))
        elements.append(
            element(f"pt_{n}", f"point {n}", "point", box, name=n, x=round(x, 1), y=round(y, 1))
        )


def side_label(cv: Canvas, pts: dict, a: str, b: str, text: str, centroid, color=LINE) -> list:
    (x0, y0), (x1, y1) = pts[a], pts[b]
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    d = math.hypot(mx - centroid[0], my - centroid[1]) or 1
    lx, ly = mx + (mx - centroid[0]) / d * cv.px(16), my + (my - centroid[1]) / d * cv.px(16)
    return union(cv.text((lx, ly), text, size=15, fill=color), clamp_box((x0, y0, x1, y1), cv.size))
