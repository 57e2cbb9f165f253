"""Response and model-level VAS: batching invariance, the work-store stage, rejects, the CLI."""

from __future__ import annotations

import io
import json

import polars as pl
import pytest
import torch
from PIL import Image

from pipeline.executor import run_stage
from pipeline.ids import sample_id
from pipeline.images import image_record
from pipeline.store import WorkStore
from pipeline.vas import VASConfig, VASItem
from pipeline.vas.__main__ import main
from pipeline.vas.scoring import _result, model_vas, score_items
from pipeline.vas.stage import VASStage
from tests.support.lens import SAMPLES, tiny_models
from tests.support.samples import validate_sample

SOURCE = "test/vas"


def _png(seed: int, size) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _records():
    records = []
    for i, (sizes, question, answer) in enumerate(SAMPLES * 2):  # 6 samples, varied lengths
        blobs = [_png(10 * i + j, size) for j, size in enumerate(sizes)]
        records.append({"id": sample_id(blobs, question + str(i), SOURCE), "images": [image_record(b) for b in blobs],
                        "question": question + " " * i, "gold_answer": "2", "answer_type": "number",
                        "source": SOURCE, "response": answer})
    return records


def _config(**kw):
    return VASConfig(**{"model": "tiny", "max_pixels": 28 * 28 * 16, "progress": False, **kw})


def _items(records):
    from pipeline.images import pil_images
    return [VASItem(r["id"], pil_images(r), r["question"], r["response"]) for r in records]


@pytest.mark.parametrize("queries", ["response", "user"])
def test_scores_do_not_depend_on_batching(queries):
    model, _, processor = tiny_models()
    items = _items(_records())
    alone = score_items(model, processor, items, _config(queries=queries, batch_size=1))
    batched = score_items(model, processor, items, _config(queries=queries, batch_size=4))
    for a, b in zip(alone, batched, strict=True):
        assert a["raw"] == pytest.approx(b["raw"], rel=1e-5)
        assert a["normalized"] == pytest.approx(b["normalized"], rel=1e-5)
        assert (a["n_image_tokens"], a["n_system_tokens"]) == (b["n_image_tokens"], b["n_system_tokens"])
    first = alone[0]
    assert first["queries"] == queries and first["layers"] == [0, 1, 2, 3] and first["max_pixels"] == 28 * 28 * 16
    assert first["normalized"] == pytest.approx(first["raw"] * first["n_system_tokens"] / first["n_image_tokens"])
    assert len({round(r["raw"], 6) for r in alone}) > 1  # samples differ


def test_stage_in_work_store_validates_rejects_and_resumes(tmp_path):
    model, _, processor = tiny_models()
    records = _records()
    broken = dict(records[1], id="f" * 32, images=[dict(records[1]["images"][0], bytes=b"not an image")])
    no_answer = {k: v for k, v in records[2].items() if k != "response"} | {"id": "e" * 32}
    store = WorkStore(tmp_path / "store")
    stage = VASStage(_config(layers=[0, -1]), model=model, processor=processor)
    report = run_stage(stage, store.stage("vas"), records + [broken, no_answer], shard_size=4)
    assert (report.results, report.rejects) == (6, 2)
    reasons = store.stage("vas").reject_reasons()
    assert reasons == {"image_not_an_image": 1, "missing_field": 1}
    scored = list(store.stage("vas").iter_records())
    for record in scored:
        validate_sample(record, "vas")
        assert record["vas"]["layers"] == [0, 3] and record["vas"]["model"] == "tiny"
        assert record["images"][0]["bytes"][:4] == b"\x89PNG"
    again = run_stage(stage, store.stage("vas"), records + [broken, no_answer], shard_size=4)
    assert (again.skipped, again.results, again.rejects) == (8, 0, 0)


def test_one_forward_gives_user_and_response_views():
    model, _, processor = tiny_models()
    items = _items(_records()[:3])
    response = score_items(model, processor, items, _config(queries="response"))
    user = score_items(model, processor, items, _config(queries="user"))
    for r, u in zip(response, user, strict=True):
        assert set(r["views"]) == {"user", "response"} and set(u["views"]) == {"user"}
        assert r["views"]["response"]["raw"] == r["raw"] and r["views"]["response"]["image_share"] == r["budget"]["image"]
        for view, value in u["views"]["user"].items():  # the user rows of the response forward
            assert r["views"]["user"][view] == pytest.approx(value, rel=1e-5)


def test_stage_scores_negative_controls_beside_each_sample(tmp_path):
    from pipeline.seeds import generate_problem
    from pipeline.synthesis.teachers.programmatic import write

    model, _, processor = tiny_models()
    seeds = [generate_problem(family, seed, 2, 320, 0.0) for family, seed in (("shapes", 1), ("counting", 2))]
    records = [{**r, "response": write("anchor", r)} for r in seeds]
    stage = VASStage(_config(controls=["wrong_claims", "text_only", "blank_image"]), model=model, processor=processor)
    shapes, counting = stage.run(records)
    assert set(shapes["vas"]["controls"]) == {"wrong_claims", "text_only", "blank_image"}
    assert set(counting["vas"]["controls"]) == {"text_only", "blank_image"}  # no counterfactual for counting
    real = shapes["vas"]["views"]
    for kind, control in shapes["vas"]["controls"].items():
        assert set(control["views"]) == {"user", "response"}
        assert (control["views"]["user"] == real["user"]) == (kind != "blank_image")  # causal: same prefix
        assert control["views"]["response"]["raw"] != real["response"]["raw"]
    validate_sample(shapes, "vas")
    with pytest.raises(ValueError, match="vas.controls: unknown control kind"):
        _config(controls=["nope"])
    with pytest.raises(ValueError, match="need vas.queries: response"):
        _config(controls=["text_only"], queries="user")


def test_undefined_scores_are_named():
    base = {"model": "m", "queries": "response", "max_pixels": None, "layers": None}
    assert _result(base, 1.0, 1.0, 4, 0, 3).reason == "vas_no_system_tokens"
    assert _result(base, 0.0, float("nan"), 0, 6, 3).reason == "vas_no_image_tokens"
    assert _result(base, float("nan"), float("nan"), 4, 6, 0).reason == "vas_no_query_tokens"
    assert _result(base, 1.0, 1.5, 4, 6, 3)["n_image_tokens"] == 4


def test_model_vas_averages_the_probe_set():
    model, _, processor = tiny_models()
    items = _items(_records()[:3])
    result = model_vas(model, processor, items, max_pixels=28 * 28 * 16, progress=False)
    assert (result.n_scored, result.n_skipped) == (3, 0)
    assert result.raw == pytest.approx(sum(s["raw"] for s in result.per_sample) / 3)
    assert all(s["queries"] == "user" for s in result.per_sample)


def test_cli_on_a_parquet_dataset_and_jsonl_resume(tmp_path, capsys):
    records = _records()[:3]
    table = pl.DataFrame({"id": [r["id"] for r in records],
                          "image": [{"bytes": r["images"][0]["bytes"], "path": None} for r in records],
                          "question": [r["question"] for r in records],
                          "response": [r["response"] for r in records]})
    data = tmp_path / "data"
    data.mkdir()
    table.write_parquet(data / "train-00000.parquet")
    out = tmp_path / "scores.parquet"
    args = ["--model", "tiny", "--data", str(data), "--batch-size", "2", "--max-pixels", str(28 * 28 * 16)]
    assert main([*args, "--out", str(out), "--layers", "0", "1"]) == 0
    scores = pl.read_parquet(out)
    assert scores["id"].to_list() == table["id"].to_list()
    assert scores["status"].to_list() == ["ok"] * 3 and (scores["raw"] > 0).all()
    # the attention budget beside VAS: one column per key set, shares summing to 1; per-layer VAS
    budget = scores.select([f"budget_{name}" for name in ("system", "image", "user", "response", "rest")])
    assert (budget.sum_horizontal() - 1.0).abs().max() < 1e-5
    assert {"vas_layer_0", "vas_layer_1", "ratio_of_means"} <= set(scores.columns)
    assert ((scores["vas_layer_0"] + scores["vas_layer_1"]) / 2 - scores["raw"]).abs().max() < 1e-4 * scores["raw"].max()
    printed = capsys.readouterr().out
    assert "VAS (response) over 3 samples" in printed and "attention budget of the queries: system" in printed

    import datasets  # a saved HF dataset with a decoded Image column (PIL images)

    saved = tmp_path / "saved"
    datasets.Dataset.from_polars(table).cast_column("image", datasets.Image()).save_to_disk(str(saved))
    args[3] = str(saved)
    jsonl = tmp_path / "scores.jsonl"
    jsonl.write_text(json.dumps({"id": records[0]["id"], "status": "ok"}) + "\n")
    assert main([*args, "--out", str(jsonl), "--queries", "user"]) == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [row["id"] for row in lines] == table["id"].to_list()
    assert lines[1]["queries"] == "user"
    assert "1 already done" in capsys.readouterr().out
