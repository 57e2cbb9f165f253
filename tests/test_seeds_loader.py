"""Dataset loaders: column mapping, every bad-image kind as a reject, all local layouts.

Each test builds its dataset in tmp_path (PNG files, a corrupt file, parquet with image bytes,
``datasets.Dataset.save_to_disk``); nothing reaches the Hub.
"""

from __future__ import annotations

import inspect
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.records import Reject, validate
from pipeline.seeds import SeedsConfig, iter_seeds
from pipeline.seeds.loader import DatasetReadError, row_to_seed

GOOD, BIG = (40, 30), (120, 100)
MAX_PIXELS = 10_000  # BIG (12,000 px) is refused as image_too_large, GOOD passes


def png(size=GOOD, color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


BAD_IMAGES = {  # bytes -> the reason code the reject must carry
    "corrupt": (png()[:60], "image_corrupt"),
    "zero_byte": (b"", "image_empty"),
    "not_an_image": (b"hello, I am a text file", "image_not_an_image"),
    "bomb": (png(BIG), "image_too_large"),
}


def split(results):
    results = list(results)
    seeds = [r for r in results if not isinstance(r, Reject)]
    rejects = [r for r in results if isinstance(r, Reject)]
    return seeds, rejects


def local(path, **kw) -> SeedsConfig:
    return SeedsConfig(kind="local", path=str(path), n=None, max_source_pixels=MAX_PIXELS, **kw)


def test_save_to_disk_geometry3k_layout_with_every_bad_image(tmp_path):
    import datasets

    rows = {
        "images": [
            [{"bytes": png(), "path": None}],
            [
                {"bytes": png(color="blue"), "path": None},
                {"bytes": png(color="green"), "path": None},
            ],
        ],
        "problem": ["<image>Find x.", "<image><image>Which is larger?"],
        "answer": ["3", "12.5"],
    }
    for name, (blob, _) in BAD_IMAGES.items():
        rows["images"].append([{"bytes": blob, "path": f"{name}.png"}])
        rows["problem"].append(f"<image>{name}")
        rows["answer"].append("1")
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "g3k"))
    seeds, rejects = split(iter_seeds(local(tmp_path / "g3k")))
    assert [s["question"] for s in seeds] == ["Find x.", "Which is larger?"]
    assert [len(s["images"]) for s in seeds] == [1, 2] and [s["gold_answer"] for s in seeds] == [
        "3",
        "12.5",
    ]
    assert all(
        s["source"] == "g3k" and s["answer_type"] == "number" and s["scene"] is None for s in seeds
    )
    for s in seeds:
        validate("seed", s)
    got = {r.id: r for r in rejects}
    for i, (name, (_, reason)) in enumerate(BAD_IMAGES.items()):
        rej = got[f"g3k:row{i + 2}"]
        assert (rej.reason, rej.stage, rej.field) == (reason, "seeds", "$.images[0]")
        assert f"row {i + 2}" in rej.message and f"{name}.png" in rej.message
        validate("reject", rej.to_dict())


def test_image_folder_with_metadata_and_custom_columns(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png())
    (folder / "sub" / "b.png").write_bytes(png(color="blue"))
    (folder / "empty.png").write_bytes(b"")
    (folder / "fake.png").write_bytes(b"not a png at all")
    meta = [
        {"file_name": "a.png", "query": "How many?", "label": "4", "options": None},
        {"file_name": "sub/b.png", "query": "Pick one.", "label": "b", "options": ["cat", "dog"]},
        {"file_name": "empty.png", "query": "q", "label": "1", "options": None},
        {"file_name": "fake.png", "query": "q", "label": "1", "options": None},
        {"file_name": "gone.png", "query": "q", "label": "1", "options": None},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    config = local(folder, question_column="query", answer_column="label", choices_column="options")
    seeds, rejects = split(iter_seeds(config))
    assert [(s["question"], s["gold_answer"], s["answer_type"]) for s in seeds] == [
        ("How many?", "4", "number"),
        ("Pick one.", "B", "choice"),
    ]
    assert seeds[1]["choices"] == ["cat", "dog"] and seeds[1]["images"][0]["path"].endswith("b.png")
    assert [(r.id, r.reason, r.field) for r in rejects] == [
        ("imgs:row2", "image_empty", "$.image"),
        ("imgs:row3", "image_not_an_image", "$.image"),
        ("imgs:row4", "image_missing", "$.image"),
    ]
    assert "gone.png" in rejects[-1].message


def test_unreadable_dataset_is_one_clear_error(tmp_path):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.png").write_bytes(png())
    meta = [
        {"file_name": "a.png", "problem": "q", "answer": 4},
        {"file_name": "a.png", "problem": "q", "answer": "b"},
    ]
    (tmp_path / "mixed" / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    with pytest.raises(DatasetReadError, match="could not read .*mixed"):
        list(iter_seeds(local(tmp_path / "mixed")))


def test_parquet_file_with_bytes_paths_and_lists(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "p.png").write_bytes(png(color="green"))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "img": pa.array(
                [
                    {"bytes": png(), "path": None},
                    {"bytes": None, "path": "pics/p.png"},
                    {"bytes": None, "path": "pics/missing.png"},
                    {"bytes": b"", "path": None},
                ],
                type=image,
            ),
            "problem": ["What colour?", "And this?", "Missing?", "Empty?"],
            "answer": ["red", "green", "x", "y"],
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    seeds, rejects = split(iter_seeds(local(tmp_path / "train.parquet", image_column="img")))
    assert [(s["gold_answer"], s["answer_type"], s["source"]) for s in seeds] == [
        ("red", "text", "train"),
        ("green", "text", "train"),
    ]
    assert seeds[1]["images"][0]["path"] == "pics/p.png" and seeds[0]["images"][0]["path"] is None
    assert [(r.reason, r.field) for r in rejects] == [
        ("image_missing", "$.img"),
        ("image_empty", "$.img"),
    ]


def test_folder_of_jsonl_files_streams_lazily_and_respects_n(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "x.png").write_bytes(png())
    lines = [
        json.dumps({"images": ["x.png"], "problem": f"question {i}", "answer": str(i)})
        for i in range(30)
    ]
    (tmp_path / "ds" / "part-0.jsonl").write_text("\n".join(lines))
    stream = iter_seeds(SeedsConfig(kind="local", path=str(tmp_path / "ds"), n=5))
    assert inspect.isgenerator(stream)
    out = list(stream)
    assert [s["question"] for s in out] == [f"question {i}" for i in range(5)]
    assert len({s["id"] for s in out}) == 5  # same image, different questions -> different ids


@pytest.mark.parametrize(
    ("row", "reason", "field"),
    [
        ({"images": [png()], "answer": "1"}, "field_missing", "$.problem"),
        ({"images": [png()], "problem": "  ", "answer": "1"}, "field_missing", "$.problem"),
        (
            {"images": [png()], "problem": ["a", "list"], "answer": "1"},
            "schema_invalid",
            "$.problem",
        ),
        ({"images": [png()], "problem": "q", "answer": None}, "field_missing", "$.answer"),
        ({"images": [png()], "problem": "q", "answer": {"v": 1}}, "schema_invalid", "$.answer"),
        ({"problem": "q", "answer": "1"}, "field_missing", "$.images"),
        ({"images": [], "problem": "q", "answer": "1"}, "field_missing", "$.images"),
        ({"images": [3.5], "problem": "q", "answer": "1"}, "schema_invalid", "$.images[0]"),
        (
            {"images": [{"path": None}], "problem": "q", "answer": "1"},
            "field_missing",
            "$.images[0]",
        ),
        ({"images": [png()], "problem": "<image>", "answer": "1"}, "field_missing", "$.problem"),
    ],
)
def test_missing_and_wrongly_typed_fields_are_named(row, reason, field):
    out = row_to_seed(row, 7, SeedsConfig(kind="local", path="."), "mini", None)
    assert isinstance(out, Reject) and (out.reason, out.field) == (reason, field)
    assert out.message.startswith("mini row 7: field " + field)


def test_answer_types_and_difficulty_mapping():
    config = SeedsConfig(
        kind="local", path=".", choices_column="choices", difficulty_column="level"
    )
    base = {"images": [png()], "problem": "q"}
    cases = [
        ({"answer": "(c)", "choices": ["1", "2", "3"]}, "choice", "C"),
        ({"answer": "2", "choices": ["1", "2", "3"]}, "choice", "B"),
        ({"answer": "1,250", "choices": None}, "number", "1,250"),
        ({"answer": "x^2", "choices": None}, "text", "x^2"),
    ]
    for extra, answer_type, gold in cases:
        out = row_to_seed({**base, **extra, "level": 3}, 0, config, "mini", None)
        assert (out["answer_type"], out["gold_answer"], out["difficulty"]) == (answer_type, gold, 3)
    bad = row_to_seed({**base, "answer": "1", "choices": None, "level": 9}, 0, config, "mini", None)
    assert (bad.reason, bad.field) == ("schema_invalid", "$.level")
    forced = row_to_seed(
        {**base, "answer": "x^2"},
        0,
        SeedsConfig(kind="local", path=".", answer_type="expression"),
        "mini",
        None,
    )
    assert forced["answer_type"] == "expression"


def test_relative_paths_resolve_against_image_root(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "r.png").write_bytes(png())
    config = SeedsConfig(kind="local", path=".", image_root=str(tmp_path / "root"))
    out = row_to_seed(
        {"images": "r.png", "problem": "q", "answer": "1"},
        0,
        config,
        "mini",
        Path(config.image_root),
    )
    assert not isinstance(out, Reject) and out["images"][0]["width"] == GOOD[0]


def test_bad_paths_and_hub_config_fail_early(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list(iter_seeds(SeedsConfig(kind="local", path=str(tmp_path / "nope"))))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a dataset folder"):
        list(iter_seeds(SeedsConfig(kind="local", path=str(tmp_path / "x.txt"))))
    with pytest.raises(ValueError, match="repo_id"):
        SeedsConfig(kind="hub")


@pytest.mark.parametrize("streaming", [True, False])
def test_hub_path_reads_undecoded_images(monkeypatch, streaming):
    """The Hub code path, with ``datasets.load_dataset`` replaced (tests never reach the Hub)."""
    import datasets

    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    rows = {
        "images": [[{"bytes": png(), "path": None}], [{"bytes": b"", "path": None}]],
        "problem": ["<image>Find x.", "<image>Find y."],
        "answer": ["3", "4"],
    }
    calls = []

    def fake_load_dataset(repo_id, name=None, split=None, streaming=False):
        calls.append((repo_id, name, split, streaming))
        table = datasets.Dataset.from_dict(rows, features=features)
        return table.to_iterable_dataset() if streaming else table

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = SeedsConfig(
        kind="hub",
        repo_id="someone/geo",
        config_name="main",
        split="test",
        n=None,
        streaming=streaming,
    )
    seeds, rejects = split(iter_seeds(config))
    assert calls == [("someone/geo", "main", "test", streaming)]
    assert [(s["question"], s["source"]) for s in seeds] == [("Find x.", "someone/geo")]
    assert [(r.id, r.reason) for r in rejects] == [("someone/geo:row1", "image_empty")]
