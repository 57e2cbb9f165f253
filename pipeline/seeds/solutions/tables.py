"""Table chains: find the row and column, read cells, compute; a look-alike row misleads first."""

from __future__ import annotations

from pipeline.seeds.solutions.common import Solution, Voice, els_by_id, sections


def solve(scene: dict, voice: Voice) -> Solution:
    els = els_by_id(scene)
    op, column = scene["task"], scene["target"]["column"]
    targets = [els[i] for i in scene["target"]["elements"]]
    d = els[scene["distractors"][0]]
    first = targets[0]["attrs"]
    intro = {
        "lookup": f"I need the value where row {first['row']} meets column {column}.",
        "difference": f"I need two cells in column {column}, rows {first['row']} and "
        f"{targets[-1]['attrs']['row']}, and their difference.",
        "row_total": f"I need every value in row {first['row']}, added up.",
        "column_total": f"I need every value in column {column}, added up.",
        "max_row": f"I need the row with the largest value in column {column}.",
    }[op]
    voice.say(intro)
    if op == "max_row":
        top = targets[0]
        voice.say(f"At a glance, row {d['attrs']['row']} seems to have the largest {column} value.")
        voice.reflect(
            f"Row {d['attrs']['row']} has {d['attrs']['value']} in column {column}, but row "
            f"{first['row']} has {first['value']}.",
            f"{d['label']} holds {d['attrs']['value']}, less than the {first['value']} in {top['label']}.",
        )
        others = [
            e
            for e in scene["elements"]
            if e["kind"] == "cell" and e["attrs"]["column"] == column and e["id"] != top["id"]
        ]
        for e in others:
            voice.look(f"{e['label']} holds {e['attrs']['value']}")
        voice.say(
            f"Every other value in column {column} is below {first['value']}, so the answer is {first['row']}."
        )
        return Solution(first["row"], voice.steps)
    meant = els[scene.get("distractor_for") or targets[0]["id"]]
    want = meant["attrs"]
    alike = d["attrs"]["row"] != want["row"] and (
        d["attrs"]["row"].startswith(want["row"]) or want["row"].startswith(d["attrs"]["row"])
    )
    voice.say(
        (
            f"For {want['row']} in column {want['column']}, my first reading gives {d['attrs']['value']}.",
            f"Reading across for {want['row']} under {want['column']}, I first get {d['attrs']['value']}.",
            f"My first pass for {want['row']} and {want['column']} lands on {d['attrs']['value']}.",
        )
    )
    voice.reflect(
        f"That number sits in row {d['attrs']['row']}, column {d['attrs']['column']}, not in row "
        f"{want['row']}, column {want['column']}"
        + (f"; the names {d['attrs']['row']} and {want['row']} look alike." if alike else "."),
        f"{d['label']} holds {d['attrs']['value']}, but I need {meant['label']}.",
    )
    for t in targets:
        voice.look(
            (
                f"{t['label']} holds {t['attrs']['value']}",
                f"{t['label']} reads {t['attrs']['value']}",
                f"{t['label']} shows {t['attrs']['value']}",
            )
        )
    values = [t["attrs"]["value"] for t in targets]
    if op == "lookup":
        value = values[0]
        voice.say(f"So the value is {value}.")
    elif op == "difference":
        value = values[0] - values[1]
        voice.say(f"The difference is {values[0]} − {values[1]} = {value}.")
    else:
        value = sum(values)
        voice.say(f"Adding: {' + '.join(str(v) for v in values)} = {value}.")
    return Solution(value, voice.steps)


def describe(scene: dict) -> str:
    table = scene["table"]
    cells = {
        (e["attrs"]["row"], e["attrs"]["column"]): e["attrs"]["value"]
        for e in scene["elements"]
        if e["kind"] == "cell"
    }
    scan = (
        f'A table titled "{table["title"]}" with a shaded header row naming {len(table["columns"])} columns '
        f"({', '.join(table['columns'])}) and {len(table['rows'])} rows labelled by name "
        f"({', '.join(table['rows'])}). Every cell holds one whole number."
    )
    parts = [
        f"- Row {r}: " + ", ".join(f"{c} {cells[(r, c)]}" for c in table["columns"]) + "."
        for r in table["rows"]
    ]
    names = table["rows"]
    twins = [(a, b) for a in names for b in names if a != b and b.startswith(a)]
    links = (
        "Each number sits where its row (a name in the first column) meets its column (a header). "
        "Rows alternate white and light grey."
        + (
            " Two names look alike: " + "; ".join(f"{a} and {b}" for a, b in twins) + "."
            if twins
            else ""
        )
    )
    synthesis = (
        f"{table['title']}: "
        + "; ".join(
            f"{r}: " + ", ".join(f"{c} = {cells[(r, c)]}" for c in table["columns"]) for r in names
        )
        + "."
    )
    return sections(scan, parts, links, synthesis)
