"""Shared wording machinery for the worked solutions: deterministic phrase choice, the two
renderings of each step (plain for the reason stage, anchored for the anchor stage) and the
describe layout. See :mod:`pipeline.seeds.solutions`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pipeline.seeds.procedural import fmt_number

LOOK_PREFIXES = (
    "Look back at the {view}:",
    "Looking back at the {view},",
    "Check the image again:",
    "Returning to the image,",
    "Looking again at the {view},",
    "Re-examining the image,",
    "Look again at the {view}:",
)
WAIT_PLAIN = (
    "Wait, let me check that.",
    "Hold on, let me double-check this.",
    "Wait, let me check whether that is right.",
    "Wait, I should check this step.",
)
WAIT_LOOK = (
    "Wait, let me check the image again:",
    "Hold on, let me look back at the {view}:",
    "Wait, let me re-examine the image:",
    "Wait, let me look again at the {view}:",
)
OPENERS = (
    "Let me work through this carefully.",
    "I will solve this step by step.",
    "Let me read the {view} carefully before computing anything.",
    "First I need the relevant values from the {view}.",
)
CLOSERS = (
    "So the answer is {v}.",
    "Therefore the answer is {v}.",
    "That gives {v} as the final answer.",
    "The result is {v}.",
)
VIEW = {"geometry": "figure", "charts": "chart", "counting": "picture", "tables": "table", "shapes": "picture"}


@dataclass
class Step:
    plain: str
    anchored: str


@dataclass
class Solution:
    value: float | int | str  # numeric answer, or the correct option text
    steps: list[Step] = field(default_factory=list)


class Voice:
    """Deterministic wording: every phrase choice comes from one seeded generator."""

    def __init__(self, seed: str, family: str):
        self.rng = random.Random(seed)
        self.view = VIEW.get(family, "image")
        self.steps: list[Step] = []

    def pick(self, options) -> str:
        return self.rng.choice(options).replace("{view}", self.view)

    def say(self, text: str | tuple[str, ...]) -> None:
        """A step that does not depend on the image (a tuple: one wording picked at random)."""
        text = self.rng.choice(text) if isinstance(text, tuple) else text
        self.steps.append(Step(text, text))

    def look(self, fact: str | tuple[str, ...], tail: str = "") -> None:
        """An image-dependent step; ``fact`` names the scene element by its label."""
        fact = self.rng.choice(fact) if isinstance(fact, tuple) else fact
        tail = f" {tail}" if tail else ""
        self.steps.append(
            Step(f"{fact[0].upper()}{fact[1:]}.{tail}", f"{self.pick(LOOK_PREFIXES)} {fact}.{tail}")
        )

    def reflect(self, plain: str, seen: str) -> None:
        """The self-check: plain wording, and the anchored wording that returns to the image."""
        self.steps.append(
            Step(f"{self.pick(WAIT_PLAIN)} {plain}", f"{self.pick(WAIT_LOOK)} {seen}")
        )


def els_by_id(scene: dict) -> dict[str, dict]:
    return {e["id"]: e for e in scene["elements"]}


def num(v) -> str:
    return fmt_number(v)


def sections(scan: str, parts: list[str], links: str, synthesis: str) -> str:
    """The describe structure of SPEC/prompts: global scan, parts, links, synthesized scene."""
    return (
        "### 1. Global scan\n"
        + scan
        + "\n\n### 2. Parts\n"
        + "\n".join(parts)
        + "\n\n### 3. Links between parts\n"
        + links
        + "\n\n### 4. Synthesized scene\n"
        + synthesis
    )
