"""The response format ``<think>...</think><answer>...</answer>``: one definition for the project.

The RL format reward, the reason and anchor stages, the verify stage, the filter, the anchor
counter, the data card and the evaluation all read responses through these functions, so the
rule cannot drift between them:

* :func:`split_response` -- the strict shape (surrounding whitespace allowed; text outside the
  tags, nested or repeated tags and empty parts are not);
* :func:`format_ok` -- whether a value has that shape;
* :func:`extract_answer` -- the last ``<answer>`` body, for graders that accept free text around it;
* :func:`think_text` -- the ``<think>`` body and its offset (anchor spans are offsets into it);
* :func:`repair_think` -- restore an opening ``<think>`` a reasoning model's template swallowed;
* :func:`canonical_response` -- write a (think, answer) pair back in the one layout we store.
"""

from __future__ import annotations

import re

_FORMAT_RE = re.compile(r"\A\s*<think>([\s\S]*?)</think>\s*<answer>([\s\S]*?)</answer>\s*\Z")
_TAG_RE = re.compile(r"</?(?:think|answer)>")
_THINK_RE = re.compile(r"<think>([\s\S]*?)</think>")
_ANSWER_RE = re.compile(r"<answer>([\s\S]*?)</answer>")


def split_response(text: str | None) -> tuple[str, str] | None:
    """``(think, answer)`` of ``<think>..</think><answer>..</answer>``; None when malformed."""
    m = _FORMAT_RE.match(text or "")
    if not m:
        return None
    think, answer = m.group(1).strip(), m.group(2).strip()
    if not think or not answer or _TAG_RE.search(think) or _TAG_RE.search(answer):
        return None
    return think, answer


def format_ok(response: object) -> bool:
    """True when ``response`` is a string of exactly the think/answer shape."""
    return isinstance(response, str) and split_response(response) is not None


def extract_answer(response: str | None) -> str | None:
    """The last ``<answer>`` body of a response, stripped; None when there is none."""
    found = _ANSWER_RE.findall(response or "")
    return found[-1].strip() if found and found[-1].strip() else None


def think_text(response: str) -> tuple[str, int]:
    """The ``<think>`` body and its character offset in ``response`` (``("", 0)`` when absent)."""
    m = _THINK_RE.search(response)
    return (m.group(1), m.start(1)) if m else ("", 0)


def repair_think(text: str | None) -> str:
    """Reasoning models often emit the chain without the opening ``<think>`` (the chat template
    put it in the prompt); restore it so the strict format check sees the whole chain."""
    text = (text or "").strip()
    if "</think>" in text and "<think>" not in text:
        text = "<think>\n" + text
    return text


def canonical_response(think: str, answer: str) -> str:
    """The stored layout of a response: think on its own lines, then the answer."""
    return f"<think>\n{think}\n</think>\n<answer>{answer}</answer>"
