"""The user-turn text of a problem, one wording for the published dataset, the trainers and eval.

Rendered from ``prompts/trainer_question.j2``: the question, its choices lettered (A), (B), ...
unless the question text already lists every one of them (seed sources often embed the
options), and optionally the output-format hint the RL rewards and the answer parser expect.
"""

from __future__ import annotations

from functools import cache

import jinja2

from pipeline.resources import prompts_dir
from pipeline.templating import environment

QUESTION_TEMPLATE = "trainer_question.j2"


@cache
def _template() -> jinja2.Template:
    return environment(prompts_dir()).get_template(QUESTION_TEMPLATE)


def choice_letter(index: int) -> str:
    """A, B, ..., Z, then AA, AB, ... (choices are lettered in order)."""
    if index < 0:
        raise ValueError(f"choice index must be >= 0, got {index}")
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


def choices_listed(question: str, choices: list[str] | None) -> bool:
    """True when the question text already shows every choice."""
    return bool(choices) and all(str(c).strip() and str(c).strip() in question for c in choices)


def question_text(question: str, choices: list[str] | None = None, format_hint: bool = False) -> str:
    """The user-turn text: the question, its choices (unless already listed), the format hint."""
    shown = [] if choices_listed(question, choices) else [str(c) for c in choices or []]
    return _template().render(question=question.strip(), choices=shown,
                              format_hint=format_hint).strip()
