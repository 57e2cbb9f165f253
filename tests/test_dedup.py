import random

import pytest

from pipeline.filtering.dedup import DedupConfig, Deduplicator, Duplicate, shingles
from pipeline.records import RecordError

WORDS = ["angle", "triangle", "side", "length", "circle", "radius", "chord", "area", "look", "back", "image", "shows", "point", "line", "parallel", "equal", "sum", "degrees", "check", "mark", "label", "value", "count", "red", "blue", "bar", "chart", "axis"]


def _text(seed: int, n: int = 80) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _rec(i: int, question: str, response: str, image: str = "img") -> dict:
    return {"id": f"{i:032x}", "question": question, "response": response, "images": [{"sha256": image}]}


def test_exact_duplicate_after_normalisation_names_first_id():
    dedup = Deduplicator()
    first = _rec(1, "Find angle C.", "<think>It is 70.</think><answer>70</answer>")
    assert dedup.check_and_add(first) is None
    twin = _rec(2, "  find ANGLE c. ", "<think>It is  70.</think>\n<answer>70</answer>")
    hit = dedup.check(twin)
    assert isinstance(hit, Duplicate) and hit == first["id"] and hit.reason == "exact_duplicate"
    assert dedup.check(first) is None  # a record never duplicates itself (re-runs)


def test_near_duplicate_detected_and_different_text_kept():
    dedup = Deduplicator(threshold=0.7)
    base = _text(0)
    dedup.add(_rec(1, "Q", base))
    words = base.split()
    words[40] = "zebra"  # one word changed: most shingles survive
    hit = dedup.check(_rec(2, "Q", " ".join(words)))
    assert hit == f"{1:032x}" and hit.reason == "near_duplicate" and 0.7 <= hit.similarity < 1.0
    assert dedup.check(_rec(3, "Q", _text(99))) is None


def test_first_in_order_wins_and_rebuild_matches_incremental():
    texts = [_text(0), _text(0) + " tail", _text(5), _text(5) + " end", _text(7)]
    records = [_rec(i, "Q", t) for i, t in enumerate(texts)]
    incremental = Deduplicator(threshold=0.8)
    verdicts = [incremental.check_and_add(r) for r in records]
    assert [v.reason if v else None for v in verdicts] == [None, "near_duplicate", None, "near_duplicate", None]
    assert verdicts[1] == records[0]["id"] and verdicts[3] == records[2]["id"]
    kept = [r for r, v in zip(records, verdicts) if v is None]
    rebuilt = Deduplicator.from_records(kept, DedupConfig(threshold=0.8))
    assert len(rebuilt) == 3
    newcomer = _rec(9, "Q", _text(5) + " again")
    assert rebuilt.check(newcomer) == incremental.check(newcomer) == records[2]["id"]


def test_same_images_only_and_exact_only_modes():
    text = _text(3)
    strict = Deduplicator(same_images_only=True)
    strict.add(_rec(1, "Q", text, image="a"))
    assert strict.check(_rec(2, "Q", text, image="b")) is None
    assert strict.check(_rec(3, "Q", text, image="a")).reason == "exact_duplicate"
    exact_only = Deduplicator(near=False)
    exact_only.add(_rec(1, "Q", text))
    assert exact_only.check(_rec(2, "Q", text + " more words")) is None


def test_bad_input_names_field_and_config_is_checked():
    dedup = Deduplicator()
    with pytest.raises(RecordError, match=r"\$\.id"):
        dedup.check({"question": "q"})
    with pytest.raises(RecordError, match=r"\$\.response"):
        dedup.check({"id": "a" * 32, "question": "q", "response": 5})
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=0)
    with pytest.raises(TypeError, match="unknown dedup option"):
        Deduplicator(thresold=0.5)


def test_shingles():
    assert shingles("A b, c!", 5) == {"a b c"}
    assert shingles("one two three four", 3) == {"one two three", "two three four"}
    assert shingles("", 3) == set()
