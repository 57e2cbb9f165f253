import hashlib
import json
import logging

import datasets
import pyarrow.parquet as pq
import pytest

from pipeline.publishing import publish as publish_module
from pipeline.publishing.publish import (
    MANIFEST,
    PublishConfig,
    PublishError,
    publish,
    published_row,
    push_to_hub,
    split_of,
)
from pipeline.store import WorkStore
from tests.support.samples import make_record, make_records


def _config(tmp_path, **kwargs):
    kwargs = {"exports": [], "test_fraction": 0.25, "gallery_size": 3, **kwargs}
    return PublishConfig(dataset_name="demo", out_dir=str(tmp_path / "out" / "demo"),
                         cards_dir=str(tmp_path / "cards"), **kwargs)


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("publish")
    store = WorkStore(tmp_path / "store")
    records = make_records(16, n_images=2)
    records[3]["programmatic"] = True
    records[5]["choices"] = ["30", "35", "40"]
    store.stage("filter").write(records[:9])
    store.stage("filter").write(records[9:])
    config = _config(tmp_path, exports=["easyr1", "llamafactory"])
    result = publish(config, store.stage("filter").iter_records(), progress=False)
    return tmp_path, store, records, config, result


def test_folder_loads_with_both_splits_sorted_and_images_decoded(published):
    _, _, records, config, result = published
    expected = {r["id"]: r for r in records}
    want_split = {rid: split_of(rid, 0.25, 0) for rid in expected}
    assert result.splits == {s: sum(v == s for v in want_split.values()) for s in ("train", "test")}
    assert result.files == ["data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet"]
    ds = datasets.load_dataset(config.out_dir)
    assert set(ds) == {"train", "test"}
    for split in ("train", "test"):
        ids = ds[split]["id"]
        assert ids == sorted(ids) and all(want_split[i] == split for i in ids)
    row = ds["train"][0]
    rec = expected[row["id"]]
    assert len(row["images"]) == 2 and row["images"][0].size == (24, 24)
    assert row["answer"] == rec["gold_answer"] and row["response"] == rec["response"]
    assert row["vas"] == rec["vas"]["raw"] and row["vas_normalized"] == rec["vas"]["normalized"]
    assert [t["stage"] for t in row["teachers"]] == ["describe", "reason", "anchor"]
    assert row["teachers"][1] == {"stage": "reason", "backend": "openai", "model": "reasoner-2"}
    assert row["prompt_versions"][2]["sha256"] == "c" * 64
    assert row["n_anchors"] == rec["n_anchors"]
    user, assistant = row["messages"]
    assert [p["type"] for p in user["content"]] == ["image", "image", "text"]
    assert user["content"][2]["text"].startswith(rec["question"]) and "<think>" in user["content"][2]["text"]
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": rec["response"]}]}
    both = datasets.concatenate_datasets([ds["train"], ds["test"]])
    assert both.filter(lambda r: r["programmatic"])["id"] == [records[3]["id"]]
    with_choices = both.filter(lambda r: r["id"] == records[5]["id"])[0]
    assert with_choices["choices"] == ["30", "35", "40"] and "(B) 35" in with_choices["problem"]


def test_messages_feed_trl_multimodal_preparation(published):
    from trl.data_utils import prepare_multimodal_messages

    _, _, _, config, _ = published
    row = datasets.load_dataset(config.out_dir, split="train")[0]
    messages = [{**m, "content": [{k: v for k, v in p.items() if v is not None} for p in m["content"]]}
                for m in row["messages"]]
    prepared = prepare_multimodal_messages(messages, images=row["images"])
    assert [p["image"] for p in prepared[0]["content"][:2]] == row["images"]


def test_republish_same_data_is_a_noop(published):
    tmp_path, store, _, config, result = published
    before = _hashes(tmp_path / "out")
    before_card = _hashes(tmp_path / "cards")
    again = publish(config, store.stage("filter").iter_records(), progress=False)
    assert not again.changed and again.digest == result.digest
    assert _hashes(tmp_path / "out") == before  # same bytes, same mtimes: nothing rewritten
    assert _hashes(tmp_path / "cards") == before_card


def test_changed_data_rewrites_and_removes_stale_shards(tmp_path):
    config = _config(tmp_path, test_fraction=0.0, max_shard_bytes=1_000_000)
    first = publish(config, make_records(4), progress=False)
    assert first.changed and first.splits == {"train": 4}
    big = [make_record(i, n_images=1) for i in range(6)]
    for rec in big:  # ~450 kB each -> several shards of <= 1 MB
        rec["images"][0]["bytes"] += b"\x00" * 450_000
    second = publish(config, big, progress=False)
    assert second.changed and second.digest != first.digest
    shards = sorted((tmp_path / "out" / "demo" / "data").glob("*.parquet"))
    assert len(shards) >= 3 and all(f"-of-{len(shards):05d}" in p.name for p in shards)
    ids = [i for p in shards for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
    assert ids == sorted(r["id"] for r in big)
    manifest = json.loads((tmp_path / "out" / "demo" / MANIFEST).read_text())
    assert sorted(manifest["files"]) == [f"data/{p.name}" for p in shards]


def test_bad_records_are_named(tmp_path):
    rec = make_record(0)
    del rec["vas"]
    with pytest.raises(PublishError, match=rf"record {rec['id']}: field \$\.vas"):
        publish(_config(tmp_path), [rec], progress=False)
    dup = make_record(1)
    with pytest.raises(PublishError, match="appears twice"):
        publish(_config(tmp_path), [dup, dup], progress=False)
    nothing = publish(_config(tmp_path / "empty"), [], progress=False)  # a run where nothing survived
    assert nothing.empty and not list((tmp_path / "empty").rglob("*.parquet"))
    assert "No sample survived this run" in nothing.card_path.read_text()
    rec = make_record(2)
    rec["images"][0]["bytes"] = b""
    with pytest.raises(PublishError, match=r"\$\.images\[0\]\.bytes"):
        published_row(rec)


@pytest.mark.parametrize("kwargs, message", [
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"exports": ["parquet"]}, "exports"),
    ({"push": True}, "repo_id"),
    ({"dataset_name": "a/b"}, "dataset_name"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PublishConfig(**kwargs)


def test_split_is_stable_and_roughly_the_fraction():
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(2000)]
    tests = [i for i in ids if split_of(i, 0.1, 0) == "test"]
    assert 140 < len(tests) < 260
    assert tests == [i for i in ids if split_of(i, 0.1, 0) == "test"]
    assert all(split_of(i, 0.0, 0) == "train" for i in ids)


def test_push_refuses_without_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = _config(tmp_path, push=True, repo_id="org/demo")
    with pytest.raises(PublishError, match="HF_TOKEN is not set"):
        publish(config, make_records(2), progress=False)
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_push_uses_env_token_and_never_writes_it(tmp_path, monkeypatch, caplog):
    secret = "hf_TESTSECRET_0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return type("Info", (), {"commit_url": "https://hub.example/commit/1"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    caplog.set_level(logging.DEBUG)
    config = _config(tmp_path, push=True, repo_id="org/demo", revision="v1", exports=["llamafactory"])
    result = publish(config, make_records(3), provenance={"config_digest": "x" * 64, "config": {}}, progress=False)
    assert result.pushed_url == "https://hub.example/commit/1"
    assert calls[0] == ("init", secret)
    assert calls[1] == ("create_repo", "org/demo", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert calls[2][0] == "create_branch" and calls[2][2]["branch"] == "v1"
    upload = calls[3][1]
    assert upload["repo_id"] == "org/demo" and upload["revision"] == "v1" and upload["repo_type"] == "dataset"
    assert "token" not in upload
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in caplog.text
    # a second push refuses to upload a card that somehow carries the token
    readme = tmp_path / "out" / "demo" / "README.md"
    readme.write_text(readme.read_text() + secret)
    with pytest.raises(Exception, match="HF_TOKEN"):
        push_to_hub(config, readme.parent)
    assert publish_module.os.environ["HF_TOKEN"] == secret  # untouched


def test_trainer_views_accept_the_published_folder(published):
    from trainer.data import load_table, rl_dataset, sft_dataset

    _, _, records, config, _ = published
    table = load_table(config.out_dir, split="train")
    sft = sft_dataset(table)
    assert sft[0]["messages"][-1]["content"][0]["text"].startswith("<think>")
    rl = rl_dataset(table)
    by_id = {r["id"]: r for r in records}
    assert all(row["answer"] == by_id[row["id"]]["gold_answer"] for row in rl)


def test_choices_are_appended_once():
    from pipeline.questions import question_text

    embedded = "Which is largest?\nChoices:\nA. Oslo\nB. Lima"
    assert question_text(embedded, ["Oslo", "Lima"], format_hint=False) == embedded
    plain = question_text("Which is largest?", ["Oslo", "Lima"], format_hint=False)
    assert plain.count("Oslo") == 1 and "(B) Lima" in plain
    hinted = question_text("Which is largest?", None, format_hint=True)
    assert hinted.startswith("Which is largest?") and "<answer>" in hinted


def test_staging_left_by_a_killed_publish_is_removed(tmp_path):
    import subprocess
    import sys

    config = _config(tmp_path, test_fraction=0.0)
    out = tmp_path / "out" / "demo"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for pid in (dead, str(publish_module.os.getppid())):  # a finished process, a live one
        (out / f".staging-{pid}" / "rows").mkdir(parents=True)
    publish(config, make_records(3), progress=False)
    assert not (out / f".staging-{dead}").exists()
    assert (out / f".staging-{publish_module.os.getppid()}").exists()  # may still be writing
    assert datasets.load_dataset(str(out), split="train").num_rows == 3
