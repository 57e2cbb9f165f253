import json

import pytest

from pipeline.filtering.filter import (
    FilterConfig,
    FilterStage,
    filter_records,
    run_filter,
    upper_quantile_threshold,
)
from pipeline.filtering.funnel import FUNNEL_FILE, Funnel, funnel_line, load_funnel
from pipeline.records import Reject
from pipeline.response_format import format_ok
from pipeline.store import WorkStore
from tests.support.samples import make_record, make_records


def _split(items):
    kept = [x for x in items if not isinstance(x, Reject)]
    rejects = [x for x in items if isinstance(x, Reject)]
    return kept, rejects


def _run(config, records):
    stream, stage = filter_records(config, lambda: iter(records))
    kept, rejects = _split(list(stream))
    return kept, rejects, stage


def test_each_reason_code_and_funnel_counts():
    no_anchor = "<think>B is 31 because the angles sum to 180.</think><answer>31</answer>"
    records = [
        make_record(0),                                     # kept
        make_record(1, correct=False),                      # answer_wrong
        make_record(2, response="B is 32, no tags"),         # format_invalid
        make_record(3, response=no_anchor),                  # no_anchors
        make_record(4, response="<think>Look back at the image.</think><answer>34</answer>"),  # too_short
        make_record(5, vas=0.1),                            # vas_below_threshold
        make_record(6),                                     # kept
        make_record(7, image_seed=0, question=make_record(0)["question"].upper() + "  "),  # exact_duplicate
    ]
    config = FilterConfig(min_response_length=60, vas_metric="raw", vas_threshold=1.0, dedup=True)
    kept, rejects, stage = _run(config, records)
    assert [r["id"] for r in kept] == [records[0]["id"], records[6]["id"]]
    by_id = {r.id: r.reason for r in rejects}
    assert by_id == {records[1]["id"]: "answer_wrong", records[2]["id"]: "format_invalid",
                     records[3]["id"]: "no_anchors", records[4]["id"]: "too_short",
                     records[5]["id"]: "vas_below_threshold", records[7]["id"]: "exact_duplicate"}
    assert all(r.stage == "filter" and r.field and r.message for r in rejects)
    funnel = stage.funnel()
    assert funnel.steps == {"input": 8, "correct": 7, "format": 6, "anchors": 5, "length": 4,
                            "vas": 3, "unique": 2}
    assert funnel.kept == 2
    assert funnel.rejects == {"answer_wrong": 1, "exact_duplicate": 1, "format_invalid": 1,
                              "no_anchors": 1, "too_short": 1, "vas_below_threshold": 1}
    assert sum(funnel.rejects.values()) + funnel.kept == funnel.steps["input"]
    json.dumps(funnel.to_dict())  # JSON-serialisable


def test_too_long_in_whitespace_tokens():
    config = FilterConfig(length_unit="tokens", max_response_length=10)
    kept, rejects, _ = _run(config, [make_record(0)])
    assert not kept and rejects[0].reason == "too_long" and "tokens" in rejects[0].message


def test_vas_quantile_keeps_top_fraction_over_candidates():
    # 8 candidates with raw VAS 1..8 plus two wrong answers with huge VAS that must not count.
    records = [make_record(i, vas=float(i + 1)) for i in range(8)]
    records += [make_record(20 + i, vas=1000.0, correct=False) for i in range(2)]
    config = FilterConfig(vas_metric="raw", vas_quantile=0.5)
    kept, rejects, stage = _run(config, records)
    assert sorted(r["vas"]["raw"] for r in kept) == [5.0, 6.0, 7.0, 8.0]
    assert stage.vas_info["criterion"] == "quantile"
    assert stage.vas_info["resolved_threshold"] == 5.0
    assert stage.vas_info["n_candidates"] == 8
    assert sorted(r.reason for r in rejects) == ["answer_wrong"] * 2 + ["vas_below_threshold"] * 4
    histograms = stage.funnel().vas["histograms"]
    assert sum(histograms["raw"]["counts"]) == 8 and len(histograms["raw"]["edges"]) == 6
    assert histograms["raw"]["edges"][0] == 1.0 and histograms["raw"]["edges"][-1] == 8.0
    assert sum(histograms["normalized"]["counts"]) == 8


def test_normalized_metric_and_no_criterion():
    records = [make_record(i, vas=float(i + 1)) for i in range(4)]  # normalized = raw / 4
    kept, _, _ = _run(FilterConfig(vas_metric="normalized", vas_threshold=0.75), records)
    assert len(kept) == 2
    kept, _, stage = _run(FilterConfig(), records)
    assert len(kept) == 4 and stage.vas_info["criterion"] == "none"


def test_a_view_metric_filters_and_the_funnel_line_reads_well():
    records = []
    for i in range(8):
        record = make_record(i, vas=1.0)
        views = {q: {"raw": 1.0, "normalized": 1.0, "ratio_of_means": 1.0, "image_share": i / 10} for q in ("user", "response")}
        control = {"views": {**views, "response": {**views["response"], "image_share": i / 10 - 0.05}}}
        record["vas"] = {**record["vas"], "views": views, "controls": {"text_only": control}}
        records.append(record)
    kept, _rejects, stage = _run(FilterConfig(vas_metric="response.image_share", vas_quantile=0.5, dedup=False), records)
    assert sorted(r["vas"]["views"]["response"]["image_share"] for r in kept) == [0.4, 0.5, 0.6, 0.7]
    funnel = stage.funnel().to_dict()
    assert funnel["vas"]["controls"]["auc"]["response.image_share"]["text_only"] == pytest.approx(36 / 64)
    assert funnel["vas"]["controls"]["auc"]["user.image_share"]["text_only"] == 0.5
    line = funnel_line(funnel)
    assert line.startswith("8 input -> 8 correct -> 8 format -> 8 anchors -> 8 length -> 4 vas -> 4 unique (4 kept)")
    assert "VAS: response.image_share >= 0.4, top 50%" in line and "controls: best view" in line
    assert "{" not in line  # no dict dumped into the console
    with pytest.raises(ValueError, match="filter.vas_metric: expected"):
        FilterConfig(vas_metric="response.nope")


def test_missing_fields_become_schema_rejects_naming_the_field():
    rec = make_record(0)
    del rec["verification"]
    rec2 = make_record(1)
    del rec2["vas"]
    kept, rejects, _ = _run(FilterConfig(vas_threshold=0.0), [rec, rec2])
    assert not kept
    assert [(r.reason, r.field) for r in rejects] == [("schema_invalid", "$.verification.correct"),
                                                       ("schema_invalid", "$.vas.normalized")]


def test_quantile_helper_and_format_rule():
    assert upper_quantile_threshold([], 0.5) is None
    assert upper_quantile_threshold([3.0, 1.0, 2.0], 1.0) == 1.0
    assert upper_quantile_threshold([3.0, 1.0, 2.0], 0.01) == 3.0
    assert upper_quantile_threshold([1.0, 2.0, 3.0, 4.0], 0.5) == 3.0
    assert format_ok("<think>a</think>\n<answer>b</answer>")
    assert not format_ok("<think> </think><answer>b</answer>")
    assert not format_ok("x<think>a</think><answer>b</answer>")
    assert not format_ok(None)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_anchors": 0}, "min_anchors"),
    ({"vas_threshold": 1.0, "vas_quantile": 0.5}, "exclusive"),
    ({"vas_quantile": 1.5}, "vas_quantile"),
    ({"max_response_length": 5, "min_response_length": 10}, "max_response_length"),
    ({"vas_metric": "mean"}, "vas_metric"),
])
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FilterConfig(**kwargs)


def test_stage_protocol_run_returns_one_output_per_input():
    stage = FilterStage(FilterConfig(), vas_threshold=None)
    out = stage.run([make_record(0), make_record(1, correct=False)])
    assert isinstance(out[0], dict) and isinstance(out[1], Reject)


def test_run_filter_writes_stage_and_funnel_and_is_rerunnable(tmp_path):
    store = WorkStore(tmp_path / "store")
    records = make_records(6)
    records[1]["verification"]["correct"] = False
    store.stage("seeds").write([], [Reject(id="f" * 32, stage="seeds", reason="image_corrupt", message="x")])
    store.stage("vas").write(records[:3])
    store.stage("vas").write(records[3:])
    config = FilterConfig(vas_metric="raw", vas_quantile=0.5)
    funnel = run_filter(config, store, shard_size=2, progress=False)
    out = store.stage("filter")
    assert out.counts() == {"result": funnel.kept, "reject": 6 - funnel.kept}
    # 5 correct candidates, raw VAS 2,4,5,6,7 -> top half (ceil 2.5 = 3) kept
    assert sorted(r["vas"]["raw"] for r in out.iter_records()) == [5.0, 6.0, 7.0]
    kept_images = next(out.iter_records())["images"][0]["bytes"]
    assert kept_images.startswith(b"\x89PNG")
    on_disk = json.loads((store.root / FUNNEL_FILE).read_text())
    assert on_disk["steps"]["input"] == 6 and on_disk["steps"]["unique"] == 3
    assert on_disk["vas"]["criterion"] == "quantile" and on_disk["vas"]["metric"] == "raw"
    assert on_disk["upstream"]["seeds"] == {"result": 0, "reject": 1, "reasons": {"image_corrupt": 1}}
    assert on_disk["upstream"]["vas"]["result"] == 6
    assert on_disk["config"]["vas_quantile"] == 0.5
    # a second run replaces the output instead of appending to it
    again = run_filter(config, store, progress=False)
    assert store.stage("filter").counts() == out.counts()
    assert again.to_dict() == funnel.to_dict()
    assert load_funnel(store.root).to_dict() == Funnel.from_dict(on_disk).to_dict()
    assert not [p for p in store.root.iterdir() if p.name.startswith(".filter")]


def test_an_input_stage_without_results_gives_an_empty_funnel(tmp_path):
    store = WorkStore(tmp_path)
    store.stage("vas").write([], [Reject(id="a" * 32, stage="vas", reason="vas_no_image_tokens", message="m")])
    funnel = run_filter(FilterConfig(vas_quantile=0.5), store, progress=False)
    assert funnel.kept == 0 and funnel.steps["input"] == 0
    assert funnel.upstream["vas"] == {"result": 0, "reject": 1, "reasons": {"vas_no_image_tokens": 1}}
    assert store.stage("filter").counts() == {"result": 0, "reject": 0}
    assert load_funnel(tmp_path).kept == 0


def test_near_duplicates_need_the_same_images_by_default():
    base = make_record(0)
    long_question = ("In the figure, triangle ABC has a marked angle at vertex B and a side AB of "
                     "length five; what is the measure of the angle at vertex B in degrees?")
    first = make_record(0, question=long_question)
    reworded = make_record(1, image_seed=0, question=long_question.replace("in degrees", "in deg"))
    reworded["response"] = first["response"]
    other_image = make_record(2, question=long_question)  # same text, different image
    other_image["response"] = first["response"]
    kept, rejects, _ = _run(FilterConfig(near_duplicate_threshold=0.8), [base, first, reworded, other_image])
    assert [r["id"] for r in kept] == [base["id"], first["id"], other_image["id"]]
    assert [(r.id, r.reason) for r in rejects] == [(reworded["id"], "near_duplicate")]
    assert first["id"] in rejects[0].message
    # across images too when asked
    kept, rejects, _ = _run(FilterConfig(near_duplicate_threshold=0.8, dedup_same_images_only=False),
                            [first, other_image])
    assert [r.reason for r in rejects] == ["exact_duplicate"]
    kept, rejects, _ = _run(FilterConfig(dedup=False), [first, first])
    assert len(kept) == 2 and not rejects


def test_non_finite_vas_is_rejected_not_passed():
    rec = make_record(0)
    rec["vas"]["raw"] = float("nan")
    kept, rejects, _ = _run(FilterConfig(vas_metric="raw", vas_threshold=0.5), [rec, make_record(1)])
    assert len(kept) == 1 and rejects[0].reason == "schema_invalid" and rejects[0].field == "$.vas.raw"
    kept, _, stage = _run(FilterConfig(vas_metric="raw", vas_quantile=1.0), [rec, make_record(1)])
    assert stage.vas_info["n_candidates"] == 1 and len(kept) == 1


def test_quantile_without_any_vas_rejects_instead_of_keeping():
    records = make_records(3)
    for rec in records:
        del rec["vas"]
    kept, rejects, stage = _run(FilterConfig(vas_quantile=0.5), records)
    assert not kept and {r.reason for r in rejects} == {"schema_invalid"}
    assert stage.vas_info["resolved_threshold"] is None and stage.vas_info["n_candidates"] == 0
