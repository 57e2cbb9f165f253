"""Reasoning teachers (Qwen3, DeepSeek-R1 style): the chain arrives in ``reasoning_content`` /
``reasoning`` or as a leading ``<think>`` block, over the real HTTP protocol."""

from __future__ import annotations

import pytest

from pipeline.response_format import split_response
from pipeline.synthesis.cache import RequestCache
from pipeline.synthesis.stages import (
    AnchorStage,
    DescribeStage,
    ReasonStage,
    StageConfig,
    chain_and_answer,
)
from pipeline.synthesis.teachers.base import TeacherConfig
from tests.support.samples import validate_sample
from tests.support.teacher_server import ChatCall, ChatReply, TeacherServer
from tests.test_stages import seed

CHAIN = "A is 50 and B is 60, so C = 180 - 50 - 60 = 70. Wait, check: 50 + 60 + 70 = 180. Yes."
REWRITE = "Look back at the image: angle A is marked 50 degrees. So C = 70."


def test_chain_and_answer_reads_both_shapes():
    assert chain_and_answer("<answer>70</answer>", CHAIN) == (CHAIN, "70", "reasoning")
    r1 = f"<think>\n{CHAIN}\n</think>\nSo the angle is 70 degrees.\n<answer>70</answer>"
    assert chain_and_answer(r1, None) == (CHAIN, "70", "think")
    swallowed = f"{CHAIN}\n</think>\n<answer>70</answer>"  # the template opened <think> itself
    assert chain_and_answer(swallowed, None) == (CHAIN, "70", "think")
    both = f"<think>{REWRITE}</think><answer>70</answer>"
    assert chain_and_answer(both, "I should rewrite it.", prefer="reasoning")[2] == "reasoning"
    assert chain_and_answer(both, "I should rewrite it.", prefer="think") == (REWRITE, "70", "think")
    assert chain_and_answer("70", CHAIN) is None  # no <answer>
    assert chain_and_answer("<answer>70</answer>", "") is None  # no chain anywhere
    assert chain_and_answer("<answer>70</answer>", "a <think> inside") is None


def _server_reply(call: ChatCall):
    """describe: plain text; reason: chain in the reasoning field; anchor: a thinking model's
    private thoughts in the reasoning field and the rewrite as the content's <think> block."""
    field = call.sampling.get("extra_field", "reasoning_content")
    if call.stage == "describe":
        return "A triangle ABC; angle A is marked 50 degrees, angle B 60 degrees."
    if call.stage == "reason":
        return ChatReply("\n<answer>70</answer>", reasoning=CHAIN, reasoning_field=field)
    return ChatReply(f"<think>\n{REWRITE}\n</think>\n<answer>70</answer>",
                     reasoning="The user wants look-backs; keep 70.", reasoning_field=field)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reason_takes_the_chain_from_the_reasoning_field_and_keeps_the_raw_text(tmp_path, field):
    teacher = TeacherConfig(backend="openai", model="qwen3-like", max_retries=0, timeout_s=10)
    sampling = {"extra_field": field, "chat_template_kwargs": {"enable_thinking": True}}
    seen: list[ChatCall] = []

    def reply(call):
        seen.append(call)
        return _server_reply(call)

    with TeacherServer(reply) as server:
        server.register([seed(1)])
        teacher.base_url = server.base_url
        cache = RequestCache(tmp_path / "cache.sqlite")
        config = StageConfig(teacher=teacher, sampling=sampling)
        records = [seed(1)]
        for cls in (DescribeStage, ReasonStage, AnchorStage):
            with cls(config, cache=cache, progress=False) as stage:
                records = stage.run(records)
        [rec] = records
    validate_sample(rec, "anchor")
    reason = rec["stages"]["reason"]
    assert split_response(reason["text"]) == (CHAIN, "70")  # the final chain used downstream
    assert reason["reasoning"] == CHAIN and reason["chain_source"] == "reasoning"
    assert reason["content"] == "\n<answer>70</answer>"  # the raw content, kept
    assert reason["modality"] == "text" and rec["stages"]["describe"]["modality"] == "vision"
    anchor = rec["stages"]["anchor"]
    assert anchor["chain_source"] == "think" and anchor["reasoning"].startswith("The user wants")
    assert rec["response"] == f"<think>\n{REWRITE}\n</think>\n<answer>70</answer>" and rec["n_anchors"] == 1
    # chat_template_kwargs (and other extras) reach the server as they are
    assert [c.sampling["chat_template_kwargs"] for c in seen] == [{"enable_thinking": True}] * 3
    # the reason and anchor teachers were sent no image (the paper's text-only layout)
    assert [(c.stage, len(c.images)) for c in seen] == [("describe", 1), ("reason", 0), ("anchor", 0)]
    # served again from the cache: the reasoning survives the round trip, nothing is re-sent
    with ReasonStage(config, cache=cache, progress=False) as again:
        [cached] = again.run([{**rec, "stages": {"describe": rec["stages"]["describe"]}}])
    assert cached["stages"]["reason"]["cached"] is True and cached["stages"]["reason"]["reasoning"] == CHAIN


def test_r1_style_think_block_in_the_content(tmp_path):
    def reply(call):
        if call.stage == "describe":
            return "A triangle; angle A is 50 degrees and angle B is 60 degrees."
        return f"<think>\n{CHAIN}\n</think>\n\nThe answer is 70.\n<answer>70</answer>"

    with TeacherServer(reply) as server:
        server.register([seed(2)])
        config = StageConfig(teacher=TeacherConfig(backend="openai", model="r1-like", base_url=server.base_url))
        with DescribeStage(config, progress=False) as describe, ReasonStage(config, progress=False) as reason:
            [rec] = reason.run(describe.run([seed(2)]))
    assert rec["stages"]["reason"]["chain_source"] == "think" and "reasoning" not in rec["stages"]["reason"]
    assert split_response(rec["stages"]["reason"]["text"]) == (CHAIN, "70")
