import re

import pytest
import yaml
from PIL import Image

from pipeline.filtering.filter import FilterConfig, run_filter
from pipeline.publishing.cards import (
    CardStats,
    SecretLeak,
    assert_no_secrets,
    md_escape,
    render_reasoning,
    size_category,
    write_card,
)
from pipeline.publishing.publish import FEATURES, PublishConfig, publish
from pipeline.records import Reject
from pipeline.store import WorkStore
from tests.support.samples import make_record


def _front_matter(text):
    match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "card must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def _table(text, header):
    """Rows of the first Markdown table whose header line starts with ``| header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def carded(tmp_path_factory):
    """A run through the real filter into publish: the card reports the filter's funnel."""
    tmp_path = tmp_path_factory.mktemp("cards")
    store = WorkStore(tmp_path / "store")
    records = [make_record(i, vas=float(i + 1), programmatic=i % 5 == 0,
                           source="procedural/geometry" if i % 2 else "geometry3k") for i in range(20)]
    records[1]["verification"]["correct"] = False
    records[2]["response"] = "no tags at all"
    store.stage("seeds").write([], [Reject(id="e" * 32, stage="seeds", reason="image_corrupt", message="bad png")])
    store.stage("vas").write(records)
    funnel = run_filter(FilterConfig(vas_metric="raw", vas_quantile=0.5), store, progress=False)
    config = PublishConfig(dataset_name="demo", out_dir=str(tmp_path / "out" / "demo"),
                           cards_dir=str(tmp_path / "cards"), test_fraction=0.2, exports=[])
    provenance = {"config_digest": "d" * 64,
                  "config": {"stages": {"reason": {"teacher": {"price_input_per_mtok": 1.0, "price_output_per_mtok": 2.0}}}}}
    result = publish(config, store.stage("filter").iter_records(), funnel=funnel.to_dict(),
                     provenance=provenance, progress=False)
    text = result.card_path.read_text()
    return tmp_path, funnel, result, text


def test_front_matter_has_hub_keys(carded):
    _, _, result, text = carded
    meta = _front_matter(text)
    assert {"license", "task_categories", "language", "size_categories", "configs", "dataset_info"} <= set(meta)
    assert meta["license"] == "cc-by-4.0" and meta["size_categories"] == ["n<1K"]
    assert "visual-question-answering" in meta["task_categories"]
    files = {f["split"]: f["path"] for f in meta["configs"][0]["data_files"]}
    assert files == {s: f"data/{s}-*" for s in result.splits}
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == result.splits
    assert [f["name"] for f in meta["dataset_info"]["features"]] == list(FEATURES)


def test_card_is_copied_into_the_dataset_folder(carded):
    _, _, result, text = carded
    assert (result.out_dir / "README.md").read_text() == text
    assert (result.out_dir / "vas_histogram.png").is_file()


def test_funnel_numbers_match_the_filter(carded):
    _, funnel, _, text = carded
    labels = {"input": "filter input", "correct": "answer verified", "format": "format ok",
              "anchors": "has visual anchors", "length": "length within bounds",
              "vas": "VAS criterion passed", "unique": "not a duplicate (kept)"}
    steps = {label: int(n.replace(",", "")) for label, n in _table(text, "filter step |")}
    assert steps == {labels[k]: v for k, v in funnel.steps.items()}
    assert steps["filter input"] == 20
    reasons = {r: int(n) for r, n in _table(text, "filter reject reason |")}
    assert reasons == funnel.rejects == {"answer_wrong": 1, "format_invalid": 1, "vas_below_threshold": 9}
    upstream = {row[0]: row for row in _table(text, "store stage |")}
    assert upstream["seeds"][1:] == ["0", "1", "image_corrupt: 1"]
    assert upstream["vas"][1:3] == ["20", "0"]
    assert f"top 50.0% by raw VAS over 18 candidates: raw VAS >= {funnel.vas['resolved_threshold']:.4g}" in text


def test_pipeline_section_usage_cost_and_programmatic_label(carded):
    _, _, result, text = carded
    stages = {row[0]: row for row in _table(text, "stage | teacher")
              if row[0] in ("describe", "reason", "anchor")}
    assert "`reasoner-2`" in stages["reason"][1] and "reason v1 `bbbbbbbbbbbb`" in stages["reason"][2]
    assert "`tiny-qwen2.5-vl`" in text and "image max pixels: 262144" in text
    kept = sum(result.splits.values())
    usage = {row[0]: row for row in _table(text, "stage | samples | cached") if row[0] == "reason"}
    assert usage["reason"][1] == str(kept)
    # reason: 200 prompt + 400 completion tokens per sample at $1 / $2 per million, never cached
    assert usage["reason"][5] == f"{kept * (200 * 1.0 + 400 * 2.0) / 1e6:.4f}"
    assert "**Programmatic data:**" in text and "`programmatic = true`" in text


def test_gallery_thumbnails_and_histogram_exist_and_open(carded):
    _, _, result, text = carded
    card_dir = result.card_path.parent
    with Image.open(card_dir / "vas_histogram.png") as hist:
        assert hist.format == "PNG" and hist.width > 300
    refs = re.findall(r'<img src="(gallery/[0-9a-f]+-\d\.png)"', text)
    kept = sum(result.splits.values())
    assert len(refs) == min(12, kept)
    for ref in refs:
        with Image.open(card_dir / ref) as thumb:
            assert thumb.format == "PNG" and max(thumb.size) <= 256
        assert (result.out_dir / ref).is_file()
    assert sorted(p.name for p in (card_dir / "gallery").iterdir()) == sorted(r.split("/")[1] for r in refs)
    assert text.count("**Look back at the image: the triangle has a mark at B.**") == len(refs)
    sources = set(re.findall(r"^### \d+\. `[0-9a-f]+` \(([^,)]+)", text, re.MULTILINE))
    assert sources == {"geometry3k", "procedural/geometry"}  # gallery spreads over sources


def test_render_reasoning_bolds_anchor_spans_and_escapes_markup():
    response = "<think>First *note* <b>. Look back at the image: x = 2.\nDone.</think><answer>2</answer>"
    start = response.index("Look back")
    end = response.index("2.") + 2
    quote, answer = render_reasoning(response, [{"start": start, "end": end}, {"start": 0, "end": 9999}])
    assert quote == "> First \\*note\\* &lt;b&gt;. **Look back at the image: x = 2.**  \n> Done.  "
    assert answer == "2"
    quote, answer = render_reasoning("plain text", [])
    assert quote == "> plain text  " and answer is None
    assert md_escape("a_b|c") == "a\\_b\\|c"


def test_size_categories():
    assert [size_category(n) for n in (0, 999, 1000, 30_419, 2_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]


def test_secrets_never_reach_a_card(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-value-123")
    with pytest.raises(SecretLeak, match="OPENAI_API_KEY"):
        assert_no_secrets("header sk-very-secret-value-123 footer", "card")
    stats = CardStats(gallery_size=1)
    record = make_record(0, question="What does sk-very-secret-value-123 mean?")
    stats.add(record, "train")
    with pytest.raises(SecretLeak):
        write_card(tmp_path, dataset_name="x", stats=stats, features=FEATURES,
                   splits={"train": {"num_examples": 1, "num_bytes": 10}}, data_files={"train": "data/train-*"},
                   license="mit", language=["en"], task_categories=["visual-question-answering"])
    assert not (tmp_path / "README.md").exists()


def test_card_without_funnel_says_so(tmp_path):
    config = PublishConfig(dataset_name="bare", out_dir=str(tmp_path / "out"), cards_dir=str(tmp_path / "cards"),
                           exports=[], test_fraction=0.0)
    result = publish(config, [make_record(0)], progress=False)
    text = result.card_path.read_text()
    assert "No filter funnel was recorded" in text
    assert _front_matter(text)["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"}]


def test_odd_ids_make_safe_file_names():
    from pipeline.publishing.cards import safe_name

    assert safe_name("0123abcd") == "0123abcd"
    odd = safe_name("../../etc/passwd")
    assert "/" not in odd and ".." not in odd and odd != safe_name("__/__/etc/passwd")


def test_card_has_column_statistics_and_one_sample_per_split(carded):
    _, funnel, result, text = carded
    rows = {r[0]: r for r in _table(text, "column | n | min")}
    kept = sum(result.splits.values())
    assert rows["`response_chars`"][1] == str(kept) and rows["`n_anchors`"][1] == str(kept)
    vas = funnel.vas["quantiles"]["raw"]
    assert rows["VAS raw (filter candidates)"][1] == str(vas["n"])  # the exact candidate quantiles
    assert float(rows["VAS raw (filter candidates)"][5]) == pytest.approx(vas["median"], rel=1e-3)
    samples = re.findall(r"<summary>(train|test)</summary>\n\n```json\n(.*?)\n```", text, re.DOTALL)
    assert sorted(split for split, _ in samples) == sorted(result.splits)
    import json
    for _, body in samples:
        record = json.loads(body)
        assert record["images"][0]["width"] and "bytes" not in record["images"][0]
        assert record["stages"] and not re.search(r'"(created|updated|finished)_at"', body)  # run times
    assert "Answer types: " in text


def test_the_card_reproduces_its_config(tmp_path):
    """The card's command runs the config written beside it; that config has the same digest."""
    from flows import components
    from flows.config import load_synth_config
    config = load_synth_config("configs/ci_small.yaml", [f"publish.cards_dir={tmp_path}", "seeds.n=4"])
    record = make_record(0)
    result = publish(config.publish, [record], provenance=components.provenance(config), progress=False)
    text = result.card_path.read_text()
    command = re.search(r"```bash\n(python -m flows.synth --config (\S+))\n```", text)
    assert command, "no reproduce command in the card"
    assert load_synth_config(command.group(2)).digest() == config.digest()
    assert f"`{config.digest()[:16]}`" in text


def test_card_says_when_the_vas_model_has_random_weights_and_shows_the_budget(tmp_path):
    records = [make_record(i) for i in range(3)]
    for r in records:
        r["vas"].update(random_weights=True, budget={"system": 0.1, "image": 0.5, "user": 0.2,
                                                     "response": 0.1, "rest": 0.1})
    config = PublishConfig(dataset_name="rnd", out_dir=str(tmp_path / "out"), cards_dir=str(tmp_path / "cards"),
                           exports=[], test_fraction=0.0)
    text = publish(config, records, progress=False).card_path.read_text()
    assert "**The VAS reference model has random weights** (3 of 3 samples)" in text
    [header] = [line for line in text.splitlines() if line.startswith("| system | image |")]
    rows = _table(text, "system | image |")
    assert header == "| system | image | user | response | rest |" and rows == [["0.1", "0.5", "0.2", "0.1", "0.1"]]
    trained = [make_record(i) for i in range(3)]
    text = publish(config, trained, progress=False).card_path.read_text()
    assert "random weights" not in text
