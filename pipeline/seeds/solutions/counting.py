"""Counting chains: tally row by row; a look-alike colour or shape is first miscounted."""

from __future__ import annotations

from collections import Counter

from pipeline.seeds.solutions.common import Solution, Voice, els_by_id, sections


def _what(q: dict) -> str:
    return f"{q['color']} {q['shape']}s" if q["shape"] else f"{q['color']} shapes"


def _matches(attrs: dict, q: dict) -> bool:
    return attrs["color"] == q["color"] and q["shape"] in (None, attrs["shape"])


def solve(scene: dict, voice: Voice) -> Solution:
    els = els_by_id(scene)
    queries = scene["query"]
    shapes = sorted(
        (e for e in scene["elements"] if e["kind"] == "shape"),
        key=lambda e: (e["attrs"]["row"], e["attrs"]["col"]),
    )
    if len(queries) == 2:
        voice.say(
            f"I need the number of {_what(queries[0])} and the number of {_what(queries[1])}, "
            f"then the difference."
        )
    elif queries[0]["shape"]:
        voice.say(
            f"I need to count the {_what(queries[0])}: shapes that are {queries[0]['color']} and "
            f"also {queries[0]['shape']}s."
        )
    else:
        voice.say(f"I need every {queries[0]['color']} shape, whatever its form.")
    counts = []
    for i, q in enumerate(queries):
        hits = [e for e in shapes if _matches(e["attrs"], q)]
        voice.say(
            (
                f"Going row by row for the {_what(q)}:",
                f"Scanning the rows from top to bottom for the {_what(q)}:",
                f"Now I go through the picture row by row, looking for {_what(q)}:",
            )
        )
        for e in hits:
            voice.look(
                (
                    f"the {e['label']} counts",
                    f"the {e['label']} is one of them",
                    f"the {e['label']} matches",
                )
            )
        k = len(hits)
        decoys = [els[d] for d in scene["distractors"] if not _matches(els[d]["attrs"], q)]
        decoys.sort(key=lambda e: e["attrs"]["distractor"] != "similar_color")
        if i == 0 and decoys:
            d = decoys[0]["attrs"]
            voice.say(
                f"That makes {k}. The {d['shape']} at row {d['row']}, column {d['col']} also looks "
                f"{q['color']}, which would make {k + 1}."
            )
            if d["color"] != q["color"]:
                voice.reflect(
                    f"That {d['shape']} is {d['color']}, not {q['color']}: the shades are close but "
                    f"different, so it does not count.",
                    f"the {decoys[0]['label']} is {d['color']}, not {q['color']}, so it does not count.",
                )
            else:
                voice.reflect(
                    f"That shape is {d['color']}, but it is a {d['shape']}, not a {q['shape']}, so it "
                    f"does not count.",
                    f"the {decoys[0]['label']} is a {d['shape']}, not a {q['shape']}, so it does not count.",
                )
        elif i == 0:
            voice.reflect(
                f"Recounting column by column also gives {k}.",
                f"counting the {_what(q)} again column by column gives {k}.",
            )
        voice.say(
            (
                f"So there are {k} {_what(q)}.",
                f"That leaves {k} {_what(q)} in total.",
                f"The count of {_what(q)} is {k}.",
            )
        )
        counts.append(k)
    if len(counts) == 2:
        value = counts[0] - counts[1]
        voice.say(f"The difference is {counts[0]} − {counts[1]} = {value}.")
        return Solution(value, voice.steps)
    return Solution(counts[0], voice.steps)


def describe(scene: dict) -> str:
    shapes = [e for e in scene["elements"] if e["kind"] == "shape"]
    grid = scene["grid"]
    kinds = sorted({e["attrs"]["shape"] for e in shapes})
    colors = sorted({e["attrs"]["color"] for e in shapes})
    scan = (
        f"{len(shapes)} coloured shapes ({', '.join(k + 's' for k in kinds)}) on a white background, "
        f"loosely arranged in a grid of {grid['rows']} rows and {grid['cols']} columns with some cells empty. "
        f"Colours present: {', '.join(colors)}. There is no text."
    )
    parts = []
    for r in range(1, grid["rows"] + 1):
        row = sorted((e for e in shapes if e["attrs"]["row"] == r), key=lambda e: e["attrs"]["col"])
        if row:
            parts.append(
                f"- Row {r}: "
                + ", ".join(
                    f"{e['attrs']['color']} {e['attrs']['shape']} (column {e['attrs']['col']})"
                    for e in row
                )
                + "."
            )
    close = [
        (a, b)
        for a, b in (
            ("red", "orange"),
            ("blue", "purple"),
            ("yellow", "orange"),
            ("green", "yellow"),
        )
        if a in colors and b in colors
    ]
    links = "The shapes do not overlap; sizes vary a little. " + (
        "Some colours are easy to confuse: " + "; ".join(f"{a} and {b}" for a, b in close) + "."
        if close
        else "The colours are clearly distinct."
    )
    tally = Counter((e["attrs"]["color"], e["attrs"]["shape"]) for e in shapes)
    synthesis = (
        "In total: "
        + ", ".join(f"{n} {c} {s}{'s' if n > 1 else ''}" for (c, s), n in sorted(tally.items()))
        + "."
    )
    return sections(scan, parts, links, synthesis)
