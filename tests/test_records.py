import copy

import pytest

from pipeline import records
from pipeline.ids import sample_id
from tests.support.samples import seed_record, validate_sample


def test_valid_seed_passes():
    records.validate("seed", seed_record())


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda r: r.pop("question"), "$.question"),
    (lambda r: r.update(answer_type="essay"), "$.answer_type"),
    (lambda r: r["images"][0].update(bytes="not bytes"), "$.images[0].bytes"),
    (lambda r: r["images"][0].pop("width"), "$.images[0].width"),
    (lambda r: r.update(images=[]), "$.images"),
    (lambda r: r.update(id="XYZ"), "$.id"),
])
def test_invalid_seed_names_the_field(mutate, field):
    rec = seed_record()
    mutate(rec)
    with pytest.raises(records.RecordError) as exc:
        records.validate("seed", rec)
    assert exc.value.field == field
    assert field in str(exc.value) and rec["id"] in str(exc.value)


def test_sample_stage_requirements():
    rec = seed_record()
    validate_sample(rec)  # a seed is a sample with nothing added yet
    with pytest.raises(records.RecordError) as exc:
        validate_sample(rec, "describe")
    assert exc.value.field == "$.stages.describe"
    stage_out = {"text": "A triangle.", "teacher": {"backend": "programmatic", "model": "m"},
                 "prompt": {"name": "describe", "version": "1", "sha256": "0" * 64},
                 "sampling": {}, "usage": {"prompt_tokens": 1, "completion_tokens": 2},
                 "finished_at": records.utcnow()}
    rec["stages"] = {"describe": stage_out}
    validate_sample(rec, "describe")
    bad = copy.deepcopy(rec)
    bad["stages"]["describe"]["teacher"]["backend"] = "carrier-pigeon"
    with pytest.raises(records.RecordError) as exc:
        validate_sample(bad, "describe")
    assert exc.value.field == "$.stages.describe.teacher.backend"


def test_response_format_is_enforced():
    rec = seed_record(response="just an answer")
    assert records.errors("sample", rec)[0].field == "$.response"
    records.validate("sample", seed_record(response="<think>a</think>\n<answer>b</answer>"))


def test_reject_roundtrip_is_valid():
    err = records.RecordError("abc", "$.question", "missing")
    rej = records.Reject.from_error("seeds", err, source="unit")
    d = rej.to_dict()
    records.validate("reject", d)
    assert d["field"] == "$.question" and d["reason"] == "schema_invalid" and d["created_at"].endswith("Z")


def test_sample_id_is_content_hash():
    a = sample_id([b"img"], "q", "s")
    assert a == sample_id([b"img"], "q", "s")
    assert len({a, sample_id([b"img2"], "q", "s"), sample_id([b"img"], "q2", "s"),
                sample_id([b"img"], "q", "s2")}) == 4
