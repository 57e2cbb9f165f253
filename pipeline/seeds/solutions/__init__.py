"""Worked solutions and descriptions written from procedural ``scene`` metadata.

Used by the programmatic teacher (:mod:`pipeline.synthesis.teachers.programmatic`). Each family module has
``describe(scene)`` (global scan, parts, links, synthesized scene) and ``solve(scene, voice)``,
which re-derives the answer from the scene's elements alone and writes the chain twice at once:
a plain version (reason stage) and a version whose image-dependent steps return to the image
with a look-back cue and the element's label (anchor stage). Every chain contains a reflection:
a tempting wrong reading, usually the scene's distractor, that is checked and corrected.
"""

from __future__ import annotations

import importlib

from pipeline.seeds.procedural import fmt_number
from pipeline.seeds.solutions.common import CLOSERS, OPENERS, Solution, Step, Voice

FAMILIES = ("geometry", "charts", "counting", "tables", "shapes")


def _module(family: str):
    if family not in FAMILIES:
        raise KeyError(family)
    return importlib.import_module(f"pipeline.seeds.solutions.{family}")


def describe(scene: dict) -> str:
    """The four-part description of a procedural scene."""
    return _module(scene["family"]).describe(scene)


def solve(scene: dict, seed: str) -> Solution:
    """The worked solution; wording varies with ``seed`` (e.g. the sample id), logic does not."""
    voice = Voice(seed, scene["family"])
    voice.say(voice.pick(OPENERS))
    solution = _module(scene["family"]).solve(scene, voice)
    shown = solution.value if isinstance(solution.value, str) else fmt_number(solution.value)
    voice.say(voice.pick(CLOSERS).replace("{v}", shown))
    return Solution(solution.value, voice.steps)


__all__ = ["FAMILIES", "Solution", "Step", "Voice", "describe", "solve"]
