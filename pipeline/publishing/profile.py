"""Per-column statistics and one sample record per split, for the data card.

Like a data profiler's report, accumulated one published record at a time in bounded memory:
a few numbers per sample for the length columns (their quantiles are exact), counters for the
categorical ones, and for each split the record whose id hashes lowest (a stable choice: the
same data gives the same sample, whatever order it was published in).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from pipeline.filtering.funnel import quantile_summary

MAX_SAMPLE_CHARS = 600  # a long reasoning chain is cut in the card's sample record


RUN_TIME_KEYS = frozenset({"created_at", "updated_at", "finished_at"})
"""When this run did the work, not what the sample is: left out of the card, so that the same data
gives the same card bytes (the card is committed; a fresh ``make demo`` must not change it)."""


def _card_value(value, limit: int = MAX_SAMPLE_CHARS):
    """``value`` with long strings cut and run timestamps dropped, at any depth."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... [{len(value) - limit} more characters]"
    if isinstance(value, dict):
        return {k: _card_value(v, limit) for k, v in value.items() if k not in RUN_TIME_KEYS}
    if isinstance(value, list):
        return [_card_value(v, limit) for v in value]
    return value


def sample_view(record: dict) -> dict:
    """The record as the card shows it: image bytes replaced by their size and hash, long text cut,
    run timestamps left out."""
    view = {k: v for k, v in record.items() if k != "images"}
    view["images"] = [{"width": im.get("width"), "height": im.get("height"),
                       "sha256": str(im.get("sha256", ""))[:16]} for im in record.get("images") or []]
    return _card_value(view)


class ColumnProfile:
    """Lengths, answer types, anchors and image counts over the published records."""

    NUMERIC = ("question_chars", "response_chars", "response_words", "n_anchors", "n_images")

    def __init__(self):
        self.values: dict[str, list[float]] = {name: [] for name in self.NUMERIC}
        self.answer_types: Counter[str] = Counter()
        self.with_choices = 0
        self.total = 0
        self._samples: dict[str, tuple[str, dict]] = {}

    def add(self, record: dict, split: str) -> None:
        self.total += 1
        response = str(record.get("response") or "")
        for name, value in (("question_chars", len(str(record.get("question") or ""))),
                            ("response_chars", len(response)), ("response_words", len(response.split())),
                            ("n_anchors", int(record.get("n_anchors") or 0)),
                            ("n_images", len(record.get("images") or []))):
            self.values[name].append(float(value))
        self.answer_types[str(record.get("answer_type") or "?")] += 1
        self.with_choices += bool(record.get("choices"))
        rank = hashlib.sha256(str(record.get("id")).encode()).hexdigest()
        if split not in self._samples or rank < self._samples[split][0]:
            self._samples[split] = (rank, sample_view(record))

    def rows(self) -> list[dict]:
        """One row per numeric column: n and quantiles."""
        return [{"column": name, **quantile_summary(values)} for name, values in self.values.items() if values]

    def samples(self) -> list[tuple[str, str]]:
        """(split, the sample record as indented JSON), splits in name order."""
        return [(split, json.dumps(view, indent=2, ensure_ascii=False, default=str))
                for split, (_, view) in sorted(self._samples.items())]
