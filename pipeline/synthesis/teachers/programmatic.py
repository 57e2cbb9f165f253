"""The programmatic teacher: exact describe / reason / anchor texts for procedural seeds.

A real backend, not a test double: it reads ``record["scene"]`` (every element with its label,
box and values), re-derives the answer from the elements, and writes

- ``describe``: the four-part structure of SPEC (global scan, parts, links, synthesized scene);
- ``reason``: ``<think>...</think><answer>...</answer>`` with a reflection step in which a
  tempting wrong reading (the scene's distractor) is checked and corrected;
- ``anchor``: the same chain, with every image-dependent step returning to the image through a
  look-back cue counted by :mod:`pipeline.synthesis.anchors` and the element's label, so anchors link to
  scene element ids.

Output is deterministic: wording varies per sample (seeded by the sample id) but never between
runs. The answer is the number, or the option letter for multiple-choice problems; a derived
answer that disagrees with the record's gold answer is a ``scene_inconsistent`` failure, not a
silently wrong sample. Token usage is an estimate (whitespace-separated words), marked by
:attr:`ProgrammaticTeacher.usage_estimate`. Records without scene metadata fail with
``no_scene``: this teacher serves procedural seeds only.
"""

from __future__ import annotations

import time

from pipeline.seeds.procedural import LETTERS, fmt_number
from pipeline.seeds.solutions import FAMILIES, describe, solve
from pipeline.synthesis.teachers.base import (
    OnResult,
    Teacher,
    TeacherConfig,
    TeacherError,
    TeacherRequest,
    TeacherResponse,
)

WRITES = ("describe", "reason", "anchor")  # the stages this backend can write
DEFAULT_MODEL = "avar-programmatic-v1"


def _count_words(messages: list[dict]) -> int:
    words = 0
    for message in messages:
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            if isinstance(part, str):
                words += len(part.split())
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                words += len(part["text"].split())
    return words


def final_answer(value, record: dict) -> str:
    """The answer as the record expects it: an option letter, or the number as written."""
    text = value if isinstance(value, str) else fmt_number(value)
    if record.get("answer_type") == "choice":
        choices = [str(c) for c in record.get("choices") or []]
        if text not in choices:
            raise TeacherError(
                "scene_inconsistent",
                f"record {record.get('id')}: derived answer {text!r} "
                f"is not among the choices {choices}",
            )
        return LETTERS[choices.index(text)]
    return text


def write(stage: str, record: dict) -> str:
    """The text the ``stage`` teacher returns for ``record`` (raises :class:`TeacherError`)."""
    rid = record.get("id") or "<no id>"
    if stage not in WRITES:
        raise TeacherError(
            "unsupported_stage",
            f"record {rid}: the programmatic teacher writes {'/'.join(WRITES)}, not {stage!r}",
        )
    scene = record.get("scene")
    if (
        not isinstance(scene, dict)
        or not scene.get("elements")
        or scene.get("family") not in FAMILIES
        or "task" not in scene
    ):
        raise TeacherError(
            "no_scene",
            f"record {rid}: no procedural scene metadata (field $.scene); the "
            f"programmatic teacher only serves procedural seeds",
        )
    try:
        if stage == "describe":
            return describe(scene)
        solution = solve(scene, seed=f"{rid}/{scene['family']}")
    except (KeyError, TypeError, ValueError, StopIteration, IndexError) as err:
        raise TeacherError(
            "scene_invalid",
            f"record {rid}: scene metadata is incomplete for "
            f"{scene.get('family')}/{scene.get('task')}: {err!r}",
        ) from None
    answer = final_answer(solution.value, record)
    gold = str(record.get("gold_answer", "")).strip()
    if gold and answer != gold:
        raise TeacherError(
            "scene_inconsistent",
            f"record {rid}: the scene gives {answer!r} but the gold answer is {gold!r}",
        )
    steps = [s.anchored if stage == "anchor" else s.plain for s in solution.steps]
    if record.get("answer_type") == "choice":
        shown = solution.value if isinstance(solution.value, str) else fmt_number(solution.value)
        steps.append(f"Among the options, {shown} is option {answer}.")
    return "<think>\n" + "\n".join(steps) + "\n</think>\n<answer>" + answer + "</answer>"


class ProgrammaticTeacher(Teacher):
    """Backend ``programmatic``: writes from scene metadata; no network, no model."""

    usage_estimate = "whitespace_words"  # usage counts are words, not tokenizer tokens

    def __init__(self, config: TeacherConfig | None = None):
        super().__init__(config or TeacherConfig(backend="programmatic", model=DEFAULT_MODEL))

    def generate_one(self, request: TeacherRequest) -> TeacherResponse | TeacherError:
        started = time.perf_counter()
        try:
            text = write(request.stage, request.record)
        except TeacherError as err:
            return err
        return TeacherResponse(
            text=text,
            prompt_tokens=_count_words(request.messages),
            completion_tokens=len(text.split()),
            finish_reason="stop",
            model=self.model,
            latency_s=time.perf_counter() - started,
        )

    async def agenerate(
        self, requests: list[TeacherRequest], on_result: OnResult | None = None
    ) -> list[TeacherResponse | TeacherError]:
        results = []
        for i, request in enumerate(requests):
            results.append(self.generate_one(request))
            if on_result is not None:
                on_result(i, results[-1])
        return results
