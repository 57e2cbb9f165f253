"""Chart chains: read, compare, add; the misleading reading is a neighbouring bar or series."""

from __future__ import annotations

from pipeline.seeds.solutions.common import Solution, Voice, els_by_id, sections


def _why(d: dict, t: dict) -> str:
    if d["attrs"]["series"] != t["attrs"]["series"]:
        return f"the {d['attrs']['series']} series, not the {t['attrs']['series']} series"
    return f"{d['attrs']['category']}, not {t['attrs']['category']}"


def solve(scene: dict, voice: Voice) -> Solution:
    els = els_by_id(scene)
    chart, op = scene["chart"], scene["task"]
    targets = [els[i] for i in scene["target"]["elements"]]
    kind = targets[0]["kind"]
    series = scene["target"]["series"]
    sp = f" in the {series} series" if series else ""
    metric = chart["metric"]
    cats = [t["attrs"]["category"] for t in targets]
    intro = {
        "read": f"I need the {metric} for {cats[0]}{sp}.",
        "difference": f"I need how much the {metric} for {cats[0]} exceeds that for {cats[-1]}{sp}.",
        "sum": f"I need the {metric} for {cats[0]} and for {cats[-1]}{sp}, added together.",
        "total": f"I need the sum of the {metric} over every category{sp}.",
        "max": f"I need the category with the highest {metric}{sp}.",
    }[op]
    voice.say(intro)
    if series:
        legend = next(
            e for e in scene["elements"] if e["kind"] == "legend" and e["attrs"]["series"] == series
        )
        voice.look(
            f"legend {series} uses {legend['attrs']['color']}, so the {series} values are the "
            f"{legend['attrs']['color']} {kind}s"
        )
    values = [t["attrs"]["value"] for t in targets]
    if op == "max":
        top = targets[0]
        d = els[scene["distractors"][0]]
        voice.say(f"At a glance the {d['label']} looks like the highest.")
        voice.reflect(
            f"The printed values decide it: {d['attrs']['category']} has {d['attrs']['value']}, "
            f"but {top['attrs']['category']} has {top['attrs']['value']}.",
            f"the {top['label']} is labelled {top['attrs']['value']}, higher than the "
            f"{d['attrs']['value']} of {d['attrs']['category']}.",
        )
        rest = sorted(
            (
                e
                for e in scene["elements"]
                if e["kind"] == kind and e["attrs"]["series"] == series and e["id"] != top["id"]
            ),
            key=lambda e: -e["attrs"]["value"],
        )
        for e in rest:
            voice.look(f"the {e['label']} is labelled {e['attrs']['value']}")
        voice.say(
            f"All of these are below {top['attrs']['value']}, so {top['attrs']['category']} is the highest."
        )
        return Solution(top["attrs"]["category"], voice.steps)
    if op == "total":
        for t in targets:
            voice.look(f"the {t['label']} is labelled {t['attrs']['value']}")
        partial = sum(values[:-1])
        voice.say(f"Adding them: {' + '.join(str(v) for v in values[:-1])} = {partial}.")
        voice.reflect(
            f"There are {len(targets)} categories on the x axis but I added only {len(targets) - 1} "
            f"values; {cats[-1]} ({values[-1]}) is missing.",
            f"the x axis has {len(targets)} categories, and the {targets[-1]['label']} "
            f"({values[-1]}) is missing from my sum.",
        )
        value = sum(values)
        voice.say(f"Including it: {partial} + {values[-1]} = {value}.")
        return Solution(value, voice.steps)
    d = els[scene["distractors"][0]]
    meant = els[scene.get("distractor_for") or targets[0]["id"]]
    voice.say(
        (
            f"My first reading is the {d['label']}: {d['attrs']['value']}.",
            f"Reading quickly, I get {d['attrs']['value']} from the {d['label']}.",
            f"At first I take {d['attrs']['value']}, from the {d['label']}.",
        )
    )
    voice.reflect(
        f"That {kind} belongs to {_why(d, meant)}. The value I need is on the {meant['label']}.",
        f"the {d['label']} belongs to {_why(d, meant)}; the value I need is on the "
        f"{meant['label']}.",
    )
    for t in targets:
        voice.look(
            (
                f"the {t['label']} is labelled {t['attrs']['value']}",
                f"the {t['label']} shows {t['attrs']['value']}",
                f"the value printed at the {t['label']} is {t['attrs']['value']}",
            )
        )
    if op == "read":
        value = values[0]
        voice.say(f"So the {metric} for {cats[0]}{sp} is {value}.")
    elif op == "difference":
        value = values[0] - values[1]
        voice.say(f"The difference is {values[0]} − {values[1]} = {value}.")
    else:
        value = values[0] + values[1]
        voice.say(f"Together: {values[0]} + {values[1]} = {value}.")
    return Solution(value, voice.steps)


def describe(scene: dict) -> str:
    chart = scene["chart"]
    axis = next(e for e in scene["elements"] if e["id"] == "y_axis")["attrs"]
    marks = [e for e in scene["elements"] if e["kind"] in ("bar", "point")]
    kind = marks[0]["kind"]
    scan = (
        f'A {chart["type"]} chart titled "{chart["title"]}" on a white background. The y axis is '
        f'labelled "{chart["y_label"]}" and runs from 0 to {axis["max"]} in steps of {axis["step"]}, with '
        f"light grid lines; the x axis lists {len(chart['categories'])} categories: "
        f"{', '.join(chart['categories'])}. Every {kind} has its value printed next to it."
    )
    parts = [
        f'- Title: "{chart["title"]}" at the top.',
        f"- Y axis ticks: {', '.join(str(v) for v in range(0, axis['max'] + 1, axis['step']))}.",
    ]
    if any(chart["series"]):
        scan += f" A legend at the top right names two series: {' and '.join(chart['series'])}."
    for name in chart["series"]:
        own = [m for m in marks if m["attrs"]["series"] == name]
        parts.append(
            f"- {name + ' series' if name else 'Values'} ({own[0]['attrs']['color']} {kind}s): "
            + ", ".join(f"{m['attrs']['category']} {m['attrs']['value']}" for m in own)
            + "."
        )
    links = (
        f"Each {kind} stands above its category label, and its height on the y axis equals its printed value."
        + (
            " The points of each series are joined left to right by a line."
            if kind == "point"
            else ""
        )
        + (
            " The two series alternate within each category, matched to the legend by colour."
            if any(chart["series"])
            else ""
        )
    )
    synthesis = (
        f"{chart['title']}: "
        + "; ".join(
            (f"{name}: " if name else "")
            + ", ".join(
                f"{m['attrs']['category']} = {m['attrs']['value']}"
                for m in marks
                if m["attrs"]["series"] == name
            )
            for name in chart["series"]
        )
        + "."
    )
    return sections(scan, parts, links, synthesis)
