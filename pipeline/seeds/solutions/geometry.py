"""Geometry chains: angle sum with an exterior angle, parallel lines, Pythagoras."""

from __future__ import annotations

import math

from pipeline.seeds.solutions.common import Solution, Voice, els_by_id, num, sections


def _pos_phrase(pos: str, line: str) -> str:
    vertical, side = pos.split("-")
    return f"{'above' if vertical == 'top' else 'below'} line {line} and {'left' if side == 'left' else 'right'} of transversal t"


def solve(scene: dict, voice: Voice) -> Solution:
    els = els_by_id(scene)
    task = scene["task"]
    if task == "triangle_angle":
        target = els[scene["target"]["elements"][0]]
        tv = target["attrs"]["vertex"]
        voice.say(
            (
                (
                    f"The question asks for angle {tv} of triangle {scene['triangle']}. The interior angles of a "
                    f"triangle add up to 180°, so I need the other two interior angles."
                ),
                (
                    f"Angle {tv} is unknown. Since the three interior angles of triangle {scene['triangle']} sum "
                    f"to 180°, the other two interior angles will give it."
                ),
                (
                    f"I want angle {tv}. The angle sum of a triangle is 180°, so I first collect the other two "
                    f"interior angles of triangle {scene['triangle']}."
                ),
            )
        )
        interior = {}
        for eid in scene["given"]:
            a = els[eid]["attrs"]
            if a.get("exterior"):
                v, e = a["vertex"], a["value"]
                other = sum(interior.values())
                slip = 180 - other - e
                voice.say(
                    f"At {v} there is a mark of {e}°. If that were angle {v}, then angle {tv} would be "
                    f"180° − {num(other)}° − {e}° = {num(slip)}°"
                    + (", which no triangle can have." if slip <= 0 else ".")
                )
                voice.reflect(
                    f"The {e}° arc at {v} lies outside the triangle, between side {v}{tv} and the "
                    f"extension of side A{v} beyond {v}. That is the exterior angle at {v}, not angle {v}.",
                    f"the exterior angle at {v} is drawn outside the triangle, between side {v}{tv} and "
                    f"the extension of side A{v}, so {e}° is not the interior angle {v}.",
                )
                interior[v] = 180 - e
                voice.say(
                    f"The interior angle {v} and the exterior angle at {v} form a straight line, so "
                    f"angle {v} = 180° − {e}° = {num(180 - e)}°."
                )
            else:
                interior[a["vertex"]] = a["value"]
                voice.look(f"angle {a['vertex']} is marked {num(a['value'])}°")
        for eid in scene["distractors"]:
            a = els[eid]["attrs"]
            if els[eid]["kind"] == "length":
                voice.look(
                    f"side {''.join(a['endpoints'])} is labelled {num(a['length'])}",
                    "That is a length; the angle sum does not need it.",
                )
        known = list(interior.values())
        value = 180 - sum(known)
        chain = " − ".join(num(k) + "°" for k in known)
        voice.say(
            (
                f"So angle {tv} = 180° − {chain} = {num(value)}°.",
                f"Then angle {tv} = 180° − {chain} = {num(value)}°.",
                f"Subtracting from 180°: angle {tv} = 180° − {chain} = {num(value)}°.",
            )
        )
        voice.reflect(
            f"Angle {tv} is the angle marked '?' at vertex {tv}; {' + '.join(num(k) for k in known)} + "
            f"{num(value)} = 180, and the angle is drawn {'acute' if value < 90 else 'obtuse' if value > 90 else 'right'}, which fits.",
            f"angle {tv} is the angle marked '?' at vertex {tv}, drawn {'acute' if value < 90 else 'obtuse' if value > 90 else 'right'}, "
            f"which fits {num(value)}°.",
        )
        return Solution(value, voice.steps)
    if task == "parallel_angle":
        given = els[scene["given"][0]]["attrs"]
        target = els[scene["target"]["elements"][0]]["attrs"]
        x, g, t = given["value"], given["number"], target["number"]
        line_of = {"P": "m", "Q": "n"}
        voice.say(
            (
                f"Lines m and n are parallel and transversal t crosses them at P and Q. I need angle {t}.",
                (
                    f"I need angle {t}. The key fact is that m and n are parallel, both cut by transversal t "
                    f"(at P and Q)."
                ),
                f"Transversal t cuts the parallel lines m and n at P and Q; the unknown is angle {t}.",
            )
        )
        voice.look(
            f"angle {g} is marked {x}°, {_pos_phrase(given['position'], line_of[given['intersection']])}"
        )
        voice.look(
            f"angle {t} sits at {target['intersection']}, {_pos_phrase(target['position'], line_of[target['intersection']])}"
        )
        if "ang_R" in els:
            r = els["ang_R"]["attrs"]["value"]
            voice.say(
                f"There is also a {r}° mark at R, where line k crosses t; it could be a corresponding angle."
            )
            voice.reflect(
                f"Line k is tilted against m and n, so it is not parallel to them; the {r}° angle at R "
                f"tells me nothing about angle {t}.",
                f"line k is tilted against lines m and n, so it is not parallel to them and the angle "
                f"at R does not help with angle {t}.",
            )
        group = {"top-right": 0, "bottom-left": 0, "top-left": 1, "bottom-right": 1}
        same = group[given["position"]] == group[target["position"]]
        value = x if same else 180 - x
        wrong = 180 - x if same else x
        voice.say(
            f"At first glance angle {t} {'and angle ' + str(g) + ' look like they form a straight line' if same else 'looks like a copy of angle ' + str(g)}, "
            f"which would make it {wrong}°."
        )
        voice.reflect(
            f"Angle {t} is {target['position'].replace('-', ' ')} at {target['intersection']} and angle {g} is "
            f"{given['position'].replace('-', ' ')} at {given['intersection']}.",
            f"angle {t} lies {target['position'].replace('-', ' ')} at {target['intersection']}, while angle {g} "
            f"lies {given['position'].replace('-', ' ')} at {given['intersection']}.",
        )
        if target["intersection"] != given["intersection"]:
            corr = next(
                e["attrs"]
                for e in scene["elements"]
                if e["kind"] == "angle"
                and e["attrs"].get("intersection") == given["intersection"]
                and e["attrs"].get("position") == target["position"]
            )
            voice.say(
                f"Because m ∥ n, angle {t} equals its corresponding angle at {given['intersection']}, "
                f"angle {corr['number']} (same position)."
            )
            c = corr["number"]
        else:
            c = t
        if c == g:
            voice.say(f"So angle {t} = angle {g} = {x}°.")
        elif same:
            voice.say(f"Angle {c} and angle {g} are vertical angles, so they are equal: {x}°.")
        else:
            voice.say(
                f"Angle {c} and angle {g} together make a straight angle, so angle {c} = 180° − {x}° = {180 - x}°."
            )
        voice.look(
            f"angle {t} is drawn {'acute' if value < 90 else 'obtuse'}", f"That matches {value}°."
        )
        return Solution(value, voice.steps)
    # right_triangle
    sides = {
        "".join(els[e]["attrs"]["endpoints"]): els[e]["attrs"]
        for e in els
        if els[e]["kind"] == "length" and not els[e]["attrs"].get("altitude")
    }
    target = "".join(els[scene["target"]["elements"][0]]["attrs"]["endpoints"])
    hyp = next(name for name, a in sides.items() if a["hypotenuse"])
    known = {n: a["length"] for n, a in sides.items() if a["length"] is not None}
    voice.say(
        (
            (
                f"I need the length of side {target} in right triangle ABC, so the Pythagorean theorem applies "
                f"once I know which side is the hypotenuse."
            ),
            (
                f"Side {target} is unknown. In a right triangle the Pythagorean theorem links the three sides, "
                f"but I must be sure which one is the hypotenuse."
            ),
            (
                f"To find side {target} I will use a² + b² = c², where c is the hypotenuse; first I identify "
                f"the sides."
            ),
        )
    )
    for name, length in known.items():
        voice.look(f"side {name} is labelled {num(length)}")
    if "side_CD" in els:
        h = els["side_CD"]["attrs"]["length"]
        voice.say(
            f"There is also a length {num(h)} on a segment inside the triangle; it might be one of the sides."
        )
        voice.reflect(
            "That segment runs from C to point D on side AB. It is the altitude, not a side of triangle "
            "ABC, so it does not enter the theorem.",
            f"segment CD runs from C to point D on side AB, so {num(h)} is the altitude, not a side of "
            f"triangle ABC.",
        )
    if target == hyp:
        longer = max(known, key=known.get)
        shorter = min(known, key=known.get)
        w = math.sqrt(max(known[longer] ** 2 - known[shorter] ** 2, 0))
        voice.say(
            f"If side {longer} = {num(known[longer])} were the hypotenuse, the unknown side would be "
            f"√({num(known[longer])}² − {num(known[shorter])}²) ≈ {num(round(w, 1))}."
        )
        voice.reflect(
            f"The square mark is at C, and the hypotenuse is the side opposite the right angle: that is "
            f"{hyp}, the side marked '?'. Both labelled sides are legs.",
            f"the right angle at C is opposite side {hyp}, so {hyp} is the hypotenuse and both labelled "
            f"sides are legs.",
        )
        a, b = known.values()
        value = math.sqrt(a * a + b * b)
        voice.say(
            f"{hyp} = √({num(a)}² + {num(b)}²) = √({num(a * a)} + {num(b * b)}) = √{num(a * a + b * b)} = {num(round(value, 4))}."
        )
    else:
        c = known[hyp]
        leg = next(n for n in known if n != hyp)
        w = math.sqrt(c * c + known[leg] ** 2)
        voice.say(
            f"Adding squares would give {target} = √({num(c)}² + {num(known[leg])}²) ≈ {num(round(w, 1))}."
        )
        voice.reflect(
            f"That would make {target} longer than {hyp}. But {hyp} lies opposite the right angle at C, "
            f"so {hyp} = {num(c)} is the hypotenuse, the longest side; I must subtract.",
            f"the right angle at C is opposite side {hyp}, so {hyp} = {num(c)} is the hypotenuse and "
            f"the unknown side {target} is a leg.",
        )
        value = math.sqrt(c * c - known[leg] ** 2)
        voice.say(
            f"{target} = √({num(c)}² − {num(known[leg])}²) = √({num(c * c)} − {num(known[leg] ** 2)}) = "
            f"√{num(c * c - known[leg] ** 2)} = {num(round(value, 4))}."
        )
    return Solution(round(value, 4) if not float(value).is_integer() else int(value), voice.steps)


def describe(scene: dict) -> str:
    els = scene["elements"]
    pts = [e["attrs"]["name"] for e in els if e["kind"] == "point"]
    lines = [e["label"] for e in els if e["kind"] == "line"]
    angles = [e for e in els if e["kind"] == "angle"]
    marks = [
        f"{e['label']}: {e['attrs'].get('marked') or str(e['attrs']['value']) + '°'}"
        for e in angles
        if e["attrs"].get("marked") or e["attrs"].get("value") is not None
    ]
    numbered = [
        e["label"]
        for e in angles
        if e not in [a for a in angles if a["label"] in [m.split(":")[0] for m in marks]]
    ]
    if numbered:
        marks.append(f"numbered without a value: {', '.join(numbered)}")
    lengths = [
        f"{e['label']}: {num(e['attrs']['length']) if e['attrs'].get('length') is not None else '?'}"
        for e in els
        if e["kind"] == "length"
    ]
    rights = [e["label"] for e in els if e["kind"] == "right_angle"]
    kind = {
        "triangle_angle": "a triangle with angle marks",
        "parallel_angle": "two parallel lines cut by a transversal",
        "right_triangle": "a right triangle with side lengths",
    }[scene["task"]]
    parts = [f"- Points: {', '.join(pts)}."]
    if lines:
        parts.append(f"- Lines: {', '.join(lines)}.")
    if marks:
        parts.append("- Angle marks: " + "; ".join(marks) + ".")
    if lengths:
        parts.append("- Length labels: " + "; ".join(lengths) + ".")
    if rights:
        parts.append(f"- A small square marks the {rights[0]}.")
    links = {
        "triangle_angle": "Segments AB, BC and CA form triangle ABC."
        + (
            " Side AB continues past B as a thin ray; the arc between that ray and BC is the exterior angle at B."
            if any(e["id"] == "ext_B" for e in els)
            else ""
        ),
        "parallel_angle": "Transversal t crosses line m at P and line n at Q; the '>' arrows on m and n mark them "
        "parallel. Angles 1-4 surround P and 5-8 surround Q in the same order (top-left, top-right, "
        "bottom-left, bottom-right)."
        + (
            " Line k is tilted and crosses t at R; it is not parallel to m or n."
            if any(e["id"] == "line_k" for e in els)
            else ""
        ),
        "right_triangle": "Legs BC and CA meet at the right angle at C; AB is opposite it."
        + (
            " Segment CD drops from C perpendicular to AB at D."
            if any(e["id"] == "side_CD" for e in els)
            else ""
        ),
    }
    return sections(
        f"A geometry diagram on a white background: {kind}. It labels the points "
        f"{', '.join(pts)}, carries {len(angles)} angle mark(s) and {len(lengths)} length label(s).",
        parts,
        links[scene["task"]],
        f"{kind[0].upper()}{kind[1:]}; " + "; ".join(marks + lengths) + ".",
    )
