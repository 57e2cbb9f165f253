import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from pipeline.publishing.exports import IMAGE_TAG
from pipeline.publishing.publish import PublishConfig, publish
from tests.support.samples import make_record


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("exports")
    records = [make_record(i, n_images=1 + i % 3) for i in range(10)]
    config = PublishConfig(dataset_name="demo", out_dir=str(tmp_path / "out" / "demo"),
                           cards_dir=str(tmp_path / "cards"), test_fraction=0.3, gallery_size=2)
    result = publish(config, records, progress=False)
    return tmp_path, {r["id"]: r for r in records}, config, result


def test_easyr1_parquet_has_problem_with_image_placeholders(exported):
    _, records, config, result = exported
    folder = Path(result.exports["easyr1"])
    assert folder == config.exports_path() / "easyr1"
    ds = datasets.load_dataset(str(folder))
    assert set(ds) == set(result.splits)
    assert {s: len(ds[s]) for s in ds} == result.splits
    for row in ds["train"]:
        rec = records[row["id"]]
        assert row["problem"].count(IMAGE_TAG) == len(row["images"]) == len(rec["images"])
        assert row["problem"].startswith(IMAGE_TAG * len(rec["images"]) + rec["question"])
        assert row["answer"] == rec["gold_answer"]
        assert isinstance(row["images"][0], Image.Image)


def test_llamafactory_sharegpt_tags_match_images_and_files_exist(exported):
    _, records, _, result = exported
    folder = Path(result.exports["llamafactory"])
    info = json.loads((folder / "dataset_info.json").read_text())
    assert set(info) == {f"demo_{s}" for s in result.splits}
    n_rows = 0
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt"
        assert entry["columns"] == {"messages": "messages", "images": "images"}
        rows = json.loads((folder / entry["file_name"]).read_text())
        assert len(rows) == result.splits[name.removeprefix("demo_")]
        for row in rows:
            rec = records[row["id"]]
            user, assistant = row["messages"]
            assert user["role"] == "user" and assistant == {"role": "assistant", "content": rec["response"]}
            assert user["content"].count(IMAGE_TAG) == len(row["images"]) == len(rec["images"])
            for rel, image in zip(row["images"], rec["images"], strict=True):
                assert not Path(rel).is_absolute()
                assert (folder / rel).read_bytes() == image["bytes"]
            n_rows += 1
    assert n_rows == len(records)


def test_exports_are_skipped_when_unchanged(exported):
    _, records, config, result = exported
    stamp = Path(result.exports["llamafactory"]) / "dataset_info.json"
    before = stamp.stat().st_mtime_ns
    publish(config, list(records.values()), progress=False)
    assert stamp.stat().st_mtime_ns == before
