import asyncio
import hashlib
import io

import pytest
from PIL import Image

from pipeline.executor import run_stage
from pipeline.ids import sample_id
from pipeline.records import Reject
from pipeline.store import WorkStore
from pipeline.synthesis.cache import RequestCache
from pipeline.synthesis.stages import AnchorStage, DescribeStage, ReasonStage, StageConfig
from pipeline.synthesis.teachers.base import (
    Teacher,
    TeacherConfig,
    TeacherError,
    TeacherResponse,
)
from tests.support.samples import teacher_stage, validate_sample

CHAIN = "<think>The angles of a triangle sum to 180. A is 50 and B is 60, so C = 70. Wait, check: 50+60+70=180.</think><answer>70</answer>"
ANCHORED = ("<think>Look back at the image: angle A is marked 50 degrees. Check the image again: angle B "
            "is marked 60 degrees. So C = 180 - 50 - 60 = 70.</think>\n<answer>70°</answer>")


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def seed(i: int, answer_type="number", gold="70", choices=None) -> dict:
    blob = _png((i * 40 % 256, 80, 120))
    question = f"Triangle {i}: angle A is 50 and angle B is 60. Find angle C."
    return {"id": sample_id([blob], question, "procedural/test"),
            "images": [{"bytes": blob, "sha256": hashlib.sha256(blob).hexdigest(), "width": 16,
                        "height": 16, "format": "PNG", "path": None}],
            "question": question, "gold_answer": gold, "answer_type": answer_type, "choices": choices,
            "source": "procedural/test", "difficulty": 1,
            "scene": {"family": "geometry", "elements": [
                {"id": "angle_A", "label": "angle A", "kind": "angle", "bbox": [0, 0, 4, 4]},
                {"id": "angle_B", "label": "angle B", "kind": "angle", "bbox": [8, 8, 12, 12]}]}}


class ScriptedTeacher(Teacher):
    """Answers per stage from ``replies`` (text, TeacherError, or a callable of the request)."""

    def __init__(self, replies: dict, config: TeacherConfig | None = None):
        super().__init__(config or TeacherConfig(backend="openai", model="scripted"))
        self.replies, self.sent = replies, []

    async def _one(self, request):
        await asyncio.sleep(0)
        self.sent.append(request)
        reply = self.replies[request.stage]
        reply = reply(request) if callable(reply) else reply
        if isinstance(reply, TeacherError):
            return reply
        return TeacherResponse(text=reply, prompt_tokens=10, completion_tokens=len(reply.split()), model="scripted")

    async def agenerate(self, requests, on_result=None):
        out = []
        for i, request in enumerate(requests):
            out.append(await self._one(request))
            if on_result:
                on_result(i, out[-1])
        return out


REPLIES = {"describe": "A triangle ABC; angle A is marked 50 degrees, angle B 60 degrees.",
           "reason": CHAIN, "anchor": ANCHORED}


def _pipeline(records, teacher, cache=None, **cfg):
    out = records
    for cls in (DescribeStage, ReasonStage, AnchorStage):
        with cls(StageConfig(**cfg), cache=cache, teacher=teacher, progress=False) as stage:
            out = stage.run(out)
    return out


def test_three_stages_produce_a_valid_anchored_sample(tmp_path):
    teacher = ScriptedTeacher(REPLIES)
    [rec] = _pipeline([seed(1)], teacher)
    validate_sample(rec, "anchor")
    assert rec["response"] == ("<think>\nLook back at the image: angle A is marked 50 degrees. Check the image "
                               "again: angle B is marked 60 degrees. So C = 180 - 50 - 60 = 70.\n</think>\n<answer>70°</answer>")
    assert rec["n_anchors"] == 2 and [a["element"] for a in rec["anchors"]] == ["angle_A", "angle_B"]
    for name in ("describe", "reason", "anchor"):
        entry = rec["stages"][name]
        assert entry["prompt"]["name"] == name and len(entry["prompt"]["sha256"]) == 64
        assert entry["teacher"] == {"backend": "openai", "model": "scripted"}
        assert entry["cached"] is False and entry["usage"]["prompt_tokens"] == 10
        assert entry["sampling"]["seed"] == 0
    assert rec["stages"]["reason"]["sampling"]["temperature"] == 0.7
    assert rec["programmatic"] is False and rec["updated_at"]
    reason_request = next(r for r in teacher.sent if r.stage == "reason")
    user_text = reason_request.messages[1]["content"][-1]["text"]
    assert "angle A is marked 50 degrees" in user_text  # the description reached the reasoner


def test_cache_serves_repeats_and_keys_follow_prompt_and_sampling(tmp_path):
    cache = RequestCache(tmp_path / "requests.sqlite")
    first = ScriptedTeacher(REPLIES)
    _pipeline([seed(1), seed(2)], first, cache)
    assert len(first.sent) == 6 and len(cache) == 6
    again = ScriptedTeacher(REPLIES)
    out = _pipeline([seed(1), seed(2)], again, cache)
    assert again.sent == [] and all(r["stages"]["anchor"]["cached"] for r in out)
    hotter = ScriptedTeacher(REPLIES)
    _pipeline([seed(1)], hotter, cache, sampling={"temperature": 0.9})
    assert len(hotter.sent) == 3  # new sampling, new keys


def test_teacher_failures_and_bad_outputs_become_rejects_naming_record_and_field():
    recs = [seed(1), seed(2), seed(3)]
    replies = {"describe": lambda r: "" if r.record["id"] == recs[2]["id"] else "desc",
               "reason": lambda r: (TeacherError("teacher_timeout", "no response within 1s")
                                    if r.record["id"] == recs[0]["id"] else "I think it is 70."),
               "anchor": ANCHORED}
    teacher = ScriptedTeacher(replies)
    with DescribeStage(cache=None, teacher=teacher, progress=False) as describe:
        described = describe.run(recs)
    assert isinstance(described[2], Reject) and described[2].reason == "describe_empty"
    with ReasonStage(teacher=teacher, progress=False) as reason:
        reasoned = reason.run(described[:2] + [recs[2]])
    timeout, malformed, missing = reasoned
    assert timeout.reason == "teacher_timeout" and recs[0]["id"] in timeout.message
    assert timeout.field == "$.stages.reason.text"
    assert malformed.reason == "format_invalid" and malformed.field == "$.stages.reason.text"
    assert missing.reason == "missing_input" and missing.field == "$.stages.describe.text"
    summary = reason.usage_summary()
    assert summary["requests"] == 2 and summary["failures"] == 1
    assert summary["cache_hits"] == 0 and summary["cost_usd"] == 0


def test_rollouts_retry_unusable_content_with_next_seed():
    calls = []

    def flaky(request):
        calls.append(request.sampling["seed"])
        return "no tags at all" if len(calls) == 1 else CHAIN

    teacher = ScriptedTeacher(dict(REPLIES, reason=flaky))
    [described] = DescribeStage(teacher=teacher, progress=False).run([seed(1)])
    [rec] = ReasonStage(StageConfig(rollouts=2), teacher=teacher, progress=False).run([described])
    assert calls == [0, 1] and rec["stages"]["reason"]["rollout"] == 1
    [rejected] = ReasonStage(StageConfig(rollouts=1), teacher=ScriptedTeacher(dict(REPLIES, reason="bad")),
                             progress=False).run([described])
    assert rejected.reason == "format_invalid"


def test_anchor_must_keep_the_answer_and_tolerates_missing_open_think():
    teacher = ScriptedTeacher(dict(REPLIES, anchor="<think>Look back at the image: C is 80.</think><answer>80</answer>"))
    [rejected] = _pipeline([seed(1)], teacher)
    assert rejected.reason == "anchor_answer_changed" and rejected.field == "$.stages.anchor.text"
    bare = "Looking at the image, A is 50.\n</think>\n<answer>70</answer>"
    [rec] = _pipeline([seed(1)], ScriptedTeacher(dict(REPLIES, anchor=bare)))
    assert rec["response"].startswith("<think>\nLooking at the image") and rec["n_anchors"] == 1


def test_choice_answers_and_zero_anchors_are_recorded():
    choice = seed(4, answer_type="choice", gold="B", choices=["60", "70", "80"])
    replies = dict(REPLIES, reason=CHAIN.replace("<answer>70", "<answer>B"),
                   anchor="<think>C = 70 from the angle sum.</think><answer>(B)</answer>")
    [rec] = _pipeline([choice], ScriptedTeacher(replies))
    assert rec["n_anchors"] == 0 and rec["anchors"] == []
    validate_sample(rec, "anchor")


def test_runs_inside_a_running_event_loop(tmp_path):
    cache = RequestCache(tmp_path / "c.sqlite")
    teacher = ScriptedTeacher(REPLIES)

    async def inside_a_loop():
        return _pipeline([seed(1)], teacher, cache)

    [rec] = asyncio.run(inside_a_loop())
    assert rec["n_anchors"] == 2 and len(cache) == 3


def test_runs_under_the_executor_into_a_work_store(tmp_path):
    store = WorkStore(tmp_path / "store")
    teacher = ScriptedTeacher(REPLIES)
    inputs = [seed(i) for i in range(3)] + [dict(seed(9), question="")]  # last breaks the contract
    with DescribeStage(teacher=teacher, progress=False) as stage:
        report = run_stage(stage, store.stage("describe"), inputs, shard_size=2)
    assert (report.results, report.rejects) == (3, 1)
    [bad] = list(store.stage("describe").iter_rejects())
    assert bad["reason"] == "schema_invalid" and bad["field"] == "$.question"
    with pytest.raises(KeyError, match="unknown stage"):
        teacher_stage("translate")


def test_programmatic_teacher_over_procedural_seeds_end_to_end(tmp_path):
    from pipeline.seeds.config import SeedsConfig
    from pipeline.seeds.procedural import iter_procedural
    from pipeline.verify import VerifyStage

    records = list(iter_procedural(SeedsConfig(n=8, image_size=320)))
    cache = RequestCache(tmp_path / "requests.sqlite")
    out = records
    for name in ("describe", "reason", "anchor"):
        with teacher_stage(name, cache=cache, progress=False) as stage:  # default: programmatic
            out = stage.run(out)
            assert stage.usage_summary()["requests"] == 8 and stage.usage_summary()["cost_usd"] == 0
    verified = VerifyStage().run(out)
    assert all(isinstance(r, dict) and r["verification"]["correct"] for r in verified)
    assert {r["answer_type"] for r in verified} == {"number", "choice"}
    for rec in verified:
        validate_sample(rec, "verify")
        assert rec["programmatic"] is True and rec["n_anchors"] >= 1
        assert any(a["element"] for a in rec["anchors"])  # anchors name scene elements
    assert len(cache) == 24


def test_concurrent_runs_on_one_stage_share_loop_and_counters(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    teacher = ScriptedTeacher(REPLIES)
    with DescribeStage(teacher=teacher, cache=RequestCache(tmp_path / "c.sqlite"), progress=False) as stage:
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda i: stage.run([seed(i)]), range(8)))
        assert all(isinstance(o[0], dict) for o in outs)
        assert stage.usage_summary()["requests"] == 8


def test_backend_reason_codes_outside_the_contract_are_mapped():
    teacher = ScriptedTeacher(dict(REPLIES, describe=TeacherError("Weird Code!", "boom")))
    [rej] = DescribeStage(teacher=teacher, progress=False).run([seed(1)])
    assert rej.reason == "teacher_failed" and "Weird Code!" in rej.message and "boom" in rej.message
