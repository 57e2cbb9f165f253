"""The three VARD teacher stages: describe -> reason -> anchor (SPEC "VARD").

describe (a VLM by default) writes a structured description; reason and anchor (text-only
LLMs by default, reading the question and the description: the paper's layout) write the long
chain with self-reflection and its rewrite that returns to the image.

Reasoning models return their chain apart from the answer, in ``reasoning_content`` (vLLM's
``--reasoning-parser``, DeepSeek's API) or as a leading ``<think>`` block of the content.
:func:`chain_and_answer` reads both shapes: the reason stage takes the reasoning as the chain
(the long chain the paper asks for) and falls back to a ``<think>`` block; the anchor stage
takes the rewrite from the content's ``<think>`` block and falls back to the reasoning (a server
whose reasoning parser moved the block there). The stage entry keeps the raw reasoning and
content beside the final chain used (``text``).
"""

from __future__ import annotations

import re

from pipeline.records import Reject
from pipeline.response_format import (
    canonical_response,
    extract_answer,
    repair_think,
    split_response,
)
from pipeline.synthesis.anchors import CUES_VERSION, find_anchors
from pipeline.synthesis.teacher_stage import Finished, StageConfig, TeacherStage
from pipeline.synthesis.teachers.base import TeacherResponse
from pipeline.verify import answers_match

__all__ = ["AnchorStage", "DescribeStage", "ReasonStage", "StageConfig", "TeacherStage", "chain_and_answer"]

_LEADING_THINK_RE = re.compile(r"\A\s*<think>([\s\S]*?)</think>")
_TAG_RE = re.compile(r"</?(?:think|answer)>")


def chain_and_answer(text: str, reasoning: str | None,
                     prefer: str = "reasoning") -> tuple[str, str, str] | None:
    """``(chain, answer, source)`` of a teacher output, or None when it has no usable shape.

    ``source`` is "reasoning" (the chain came from the separate reasoning field) or "think" (a
    leading ``<think>`` block of the content). ``prefer`` picks the first when both are there.
    The answer is the content's last ``<answer>``; text between ``</think>`` and ``<answer>`` (a
    reasoning model's summary) is dropped.
    """
    content = repair_think(text)
    block = _LEADING_THINK_RE.match(content)
    think = block.group(1).strip() if block else ""
    answer = extract_answer(content[block.end():] if block else content)
    reasoning = (reasoning or "").strip()
    options = [("reasoning", reasoning), ("think", think)]
    if prefer == "think":
        options.reverse()
    chain, source = next(((c, s) for s, c in options if c), ("", ""))
    if not chain or not answer or _TAG_RE.search(chain) or _TAG_RE.search(answer):
        return None
    return chain, answer, source


def _finished_chain(stage: TeacherStage, record: dict, result: TeacherResponse, prefer: str,
                    extra: dict | None = None) -> Finished | Reject:
    parsed = chain_and_answer(result.text, result.reasoning, prefer)
    if parsed is None:
        shown = (result.text or "")[:120]
        return stage._reject(record, "format_invalid", "teacher output has no chain (reasoning or a "
                             f"leading <think> block) and <answer> (content starts {shown!r})",
                             f"$.stages.{stage.name}.text")
    chain, answer, source = parsed
    fields = {"chain_source": source, **(extra or {})}
    if result.reasoning:
        fields["reasoning"] = result.reasoning
    text = canonical_response(chain, answer)
    if text != (result.text or "").strip():
        fields["content"] = result.text
    return Finished(text, stage_fields=fields)


class DescribeStage(TeacherStage):
    """Stage 1: a structured description of the image(s); must be non-empty."""

    name = "describe"
    requires = ("question", "images", "answer_type")
    produces = ("stages.describe",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.modality != "vision":
            raise ValueError("teacher/modality: describe writes what the image shows; its teacher "
                             "must read the images (modality vision, a VLM)")

    def _finish(self, record: dict, result: TeacherResponse) -> Finished | Reject:
        text = (result.text or "").strip()
        if not text:
            return self._reject(record, "describe_empty", "the teacher returned an empty description",
                                "$.stages.describe.text")
        return Finished(text, stage_fields={"reasoning": result.reasoning} if result.reasoning else {})


class ReasonStage(TeacherStage):
    """Stage 2: a long chain of thought with self-reflection; must parse as think + answer."""

    name = "reason"
    default_modality = "text"
    requires = ("question", "images", "answer_type", "stages.describe")
    produces = ("stages.describe", "stages.reason")

    def _context(self, record: dict) -> dict | Reject:
        description = self._earlier(record, "describe")
        return description if isinstance(description, Reject) else {"description": description}

    def _finish(self, record: dict, result: TeacherResponse) -> Finished | Reject:
        return _finished_chain(self, record, result, prefer="reasoning")


class AnchorStage(TeacherStage):
    """Stage 3: the chain rewritten to return to the image; same answer, anchors counted."""

    name = "anchor"
    default_modality = "text"
    requires = ("question", "images", "answer_type", "stages.describe", "stages.reason")
    produces = ("stages.anchor", "response", "anchors", "n_anchors")

    def _context(self, record: dict) -> dict | Reject:
        description = self._earlier(record, "describe")
        if isinstance(description, Reject):
            return description
        reasoning = self._earlier(record, "reason")
        if isinstance(reasoning, Reject):
            return reasoning
        parsed = split_response(repair_think(reasoning))
        if parsed is None:
            return self._reject(record, "format_invalid", "the reason stage's output does not parse",
                                "$.stages.reason.text")
        return {"description": description, "chain": parsed[0], "answer": parsed[1]}

    def _finish(self, record: dict, result: TeacherResponse) -> Finished | Reject:
        finished = _finished_chain(self, record, result, prefer="think",
                                   extra={"anchor_cues_version": CUES_VERSION})
        if isinstance(finished, Reject):
            return finished
        think, answer = split_response(finished.text)  # type: ignore[misc]
        before = split_response(repair_think(record["stages"]["reason"]["text"]))[1]  # type: ignore[index]
        if answer.strip() != before.strip() and not answers_match(
                answer, before, record["answer_type"], record.get("choices")):
            return self._reject(record, "anchor_answer_changed", f"the rewrite answers {answer[:80]!r} "
                                f"but the chain answered {before[:80]!r}", "$.stages.anchor.text")
        response = canonical_response(think, answer)
        anchors = find_anchors(response, record.get("scene"))
        finished.record_fields = {"response": response, "anchors": anchors, "n_anchors": len(anchors)}
        return finished
