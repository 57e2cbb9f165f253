"""Shapes chains: find the shape the question names, read its colour or kind, or count them all;
the self-check looks at a shape that could be confused with it."""

from __future__ import annotations

from pipeline.seeds.families.shapes import CELLS, answer_of, shapes_of
from pipeline.seeds.solutions.common import Solution, Voice, sections


def _name(shape: dict) -> str:
    return f"{shape['color']} {shape['kind']} at the {shape['cell']}"


def _in_reading_order(shapes: list[dict]) -> list[dict]:
    return sorted(shapes, key=lambda s: CELLS.index(s["cell"]))


def solve(scene: dict, voice: Voice) -> Solution:
    query, shapes = scene["query"], _in_reading_order(shapes_of(scene))
    task = query["task"]
    answer = answer_of(query, shapes)
    if task in ("count", "count_color", "count_kind"):
        what = {"count": "shapes", "count_color": f"{query.get('color')} shapes", "count_kind": f"{query.get('kind')}s"}[task]
        hit = lambda s: task == "count" or s["color"] == query.get("color") or s["kind"] == query.get("kind")
        voice.say(f"I need the number of {what}, so I go through the four cells one by one.")
        matching = [s for s in shapes if hit(s)]
        for k, shape in enumerate(matching, 1):
            voice.look(f"the {_name(shape)} is number {k}")
        others = [s for s in shapes if not hit(s)]
        empty = [c for c in CELLS if c not in {s["cell"] for s in shapes}]
        if others:
            voice.reflect(f"The {others[0]['color']} {others[0]['kind']} is not one of the {what}, so it does "
                          f"not count.", f"the {_name(others[0])} is not one of the {what}.")
        elif empty:
            voice.reflect(f"The {empty[0]} cell is empty, so nothing is missed there.",
                          f"the {empty[0]} cell is empty, so there is no shape to add.")
        else:
            voice.reflect("Every cell holds one shape, so none is counted twice.",
                          "each of the four cells holds exactly one shape.")
        voice.say(f"That makes {answer} {what}.")
        return Solution(answer, voice.steps)
    if task == "color_of":
        target = next(s for s in shapes if s["kind"] == query["kind"])
        voice.say(f"I need the colour of the {query['kind']}.")
        voice.look(f"the {query['kind']} sits at the {target['cell']} and it is {target['color']}")
    elif task == "shape_of":
        target = next(s for s in shapes if s["color"] == query["color"])
        voice.say(f"I need the shape of the {query['color']} one.")
        voice.look(f"the {query['color']} shape at the {target['cell']} is a {target['kind']}")
    else:
        target = next(s for s in shapes if s["cell"] == query["cell"])
        voice.say(f"I need the {'colour' if task == 'color_at' else 'shape'} of what is at the {query['cell']}.")
        voice.look(f"the shape at the {target['cell']} is a {target['color']} {target['kind']}")
    others = [s for s in shapes if s is not target]
    if others:
        other = others[0]
        voice.reflect(f"The {other['color']} {other['kind']} at the {other['cell']} is another shape, "
                      f"so it does not change the answer.",
                      f"the {_name(other)} is a different shape, so it does not change the answer.")
    else:
        voice.reflect("It is the only shape, so there is nothing to mix it up with.",
                      f"the {_name(target)} is the only shape in the picture.")
    return Solution(answer, voice.steps)


def describe(scene: dict) -> str:
    shapes = _in_reading_order(shapes_of(scene))
    n = len(shapes)
    scan = (f"{n} solid shape{'s' if n > 1 else ''} on a white background, in a grid of 2 rows and 2 "
            f"columns with at most one shape per cell. There is no text.")
    parts = [f"- {s['cell'].capitalize()}: a {s['color']} {s['kind']}." for s in shapes]
    empty = [c for c in CELLS if c not in {s["cell"] for s in shapes}]
    links = "The shapes do not touch. " + (
        f"Empty cells: {', '.join(empty)}." if empty else "Every cell holds a shape.")
    synthesis = "In reading order: " + ", ".join(f"{s['color']} {s['kind']}" for s in shapes) + "."
    return sections(scan, parts, links, synthesis)
