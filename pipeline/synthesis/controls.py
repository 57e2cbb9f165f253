"""Negative controls: deliberately ungrounded variants of a sample, written by the programmatic
teacher, so a run can measure whether its VAS filter tells grounded responses from ungrounded
ones on its reference model (:mod:`pipeline.vas.separation`).

=================  =============================================================================
``wrong_claims``   the chain the programmatic teacher writes for another scene with the same
                   question (the family's ``counterfactual``): as anchored and as fluent as the
                   real one, but every visual claim is wrong for this image (and so is the
                   answer). Families without a ``counterfactual`` (all but ``shapes``) get none.
``text_only``      reasoning that never refers to the image, as many sentences as the real
                   chain, ending in the same answer.
``blank_image``    the real response, with each image replaced by a blank canvas of its size:
                   every visual claim is wrong for what the model sees.
=================  =============================================================================

Controls live only inside the VAS stage (scored beside their sample, their scores kept under
``vas.controls``); they are never records of the work store, so nothing can publish them.
Wording is seeded by the sample id: the same sample gets the same controls in every run.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass

from PIL import Image

from pipeline.response_format import extract_answer, think_text

CONTROL_KINDS = ("wrong_claims", "text_only", "blank_image")
CONTROL_HELP = {
    "wrong_claims": "visual claims wrong for this image (the chain of another scene, same question)",
    "text_only": "reasoning that never refers to the image, same answer",
    "blank_image": "the real response, image replaced by a blank canvas",
}
TEXT_ONLY_SENTENCES = (
    "Let me think about this question on its own terms.",
    "I will answer from the wording of the question alone.",
    "Questions like this one usually have a short answer.",
    "The question asks for a single value, so I give exactly one.",
    "Nothing in the wording rules out the usual answer.",
    "I should keep the answer short and in the requested form.",
    "Let me make sure the final answer has the expected format.",
    "There is no need to go through the steps again.",
    "A careful guess is better than no answer at all.",
    "I am fairly confident in this choice.",
)
BLANK = (255, 255, 255)


@dataclass
class Control:
    """One control of a sample: its response and, for ``blank_image``, its images."""

    kind: str
    response: str
    images: list[Image.Image] | None = None  # None: the sample's own images


def check_kinds(kinds) -> list[str]:
    unknown = [k for k in kinds if k not in CONTROL_KINDS]
    if unknown:
        raise ValueError(f"unknown control kind(s) {unknown}; choose from {list(CONTROL_KINDS)}")
    return list(kinds)


def wrong_claims(record: dict) -> str | None:
    """The anchored chain of a counterfactual scene, or None when the family has none."""
    from pipeline.synthesis.teachers.programmatic import write

    scene = record.get("scene")
    family = (scene or {}).get("family")
    if not family:
        return None
    try:
        module = importlib.import_module(f"pipeline.seeds.families.{family}")
    except ImportError:
        return None
    if not hasattr(module, "counterfactual"):
        return None
    other = module.counterfactual(scene, random.Random(f"avar-control/{record.get('id')}"))
    return write("anchor", {**record, "scene": other, "gold_answer": ""})  # no gold: its answer differs


def text_only(record: dict) -> str:
    """Sentences that never mention the image, as many as the real chain has lines, and the
    real answer."""
    response = record.get("response") or ""
    body, _ = think_text(response)
    n = max(2, min(len(TEXT_ONLY_SENTENCES), len([ln for ln in body.splitlines() if ln.strip()])))
    sentences = random.Random(f"avar-control/{record.get('id')}").sample(TEXT_ONLY_SENTENCES, n)
    answer = extract_answer(response) or str(record.get("gold_answer", ""))
    return "<think>\n" + "\n".join(sentences) + "\n</think>\n<answer>" + answer + "</answer>"


def controls_for(record: dict, images: list[Image.Image], kinds) -> list[Control]:
    """The controls of ``kinds`` that can be made for ``record`` (whose decoded images are
    ``images``), in the order of ``kinds``."""
    out = []
    for kind in kinds:
        if kind == "wrong_claims":
            text = wrong_claims(record)
            if text is not None:
                out.append(Control(kind, text))
        elif kind == "text_only":
            out.append(Control(kind, text_only(record)))
        elif kind == "blank_image":
            out.append(Control(kind, record["response"], [Image.new("RGB", im.size, BLANK) for im in images]))
        else:
            check_kinds([kind])
    return out
