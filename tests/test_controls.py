"""Negative controls written by the programmatic teacher (pipeline/synthesis/controls.py)."""

from __future__ import annotations

import pytest

from pipeline.images import pil_images
from pipeline.response_format import extract_answer, format_ok, think_text
from pipeline.seeds import generate_problem
from pipeline.synthesis.anchors import find_anchors
from pipeline.synthesis.controls import CONTROL_KINDS, check_kinds, controls_for
from pipeline.synthesis.teachers.programmatic import write


def _sample(family: str, seed: int) -> dict:
    record = generate_problem(family, seed, difficulty=3, image_size=320, choice_fraction=0.0)
    return {**record, "response": write("anchor", record)}


@pytest.mark.parametrize("seed", range(12))
def test_shapes_samples_get_every_control(seed):
    record = _sample("shapes", seed)
    images = pil_images(record)
    made = {c.kind: c for c in controls_for(record, images, CONTROL_KINDS)}
    assert list(made) == list(CONTROL_KINDS)
    wrong, text, blank = made["wrong_claims"], made["text_only"], made["blank_image"]
    # wrong claims: as anchored and well-formed as the real chain, with another answer
    assert format_ok(wrong.response) and find_anchors(wrong.response)
    assert extract_answer(wrong.response) != record["gold_answer"] and wrong.images is None
    # text only: same answer, no look-back at the image, nothing about the scene's shapes
    assert format_ok(text.response) and not find_anchors(text.response)
    assert extract_answer(text.response) == record["gold_answer"]
    reasoning = think_text(text.response)[0].lower()
    assert not any(word in reasoning for word in ("circle", "square", "triangle", "red", "picture", "image"))
    # blank image: the real response, a white canvas of the same size
    assert blank.response == record["response"]
    assert [im.size for im in blank.images] == [im.size for im in images]
    assert blank.images[0].getextrema() == ((255, 255), (255, 255), (255, 255))
    # the same sample gets the same controls in every run
    again = controls_for(record, images, CONTROL_KINDS)
    assert [c.response for c in again] == [c.response for c in made.values()]


def test_families_without_a_counterfactual_get_no_wrong_claims():
    record = _sample("counting", 3)
    kinds = [c.kind for c in controls_for(record, pil_images(record), CONTROL_KINDS)]
    assert kinds == ["text_only", "blank_image"]


def test_unknown_kinds_are_named():
    with pytest.raises(ValueError, match="unknown control kind.*'no_such'"):
        check_kinds(["text_only", "no_such"])
