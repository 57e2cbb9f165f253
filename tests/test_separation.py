"""Separation of real samples from negative controls (pipeline/vas/separation.py, pipeline/stats.py)."""

from __future__ import annotations

import math

import pytest

from pipeline.stats import auc
from pipeline.vas.separation import (
    METRICS,
    ControlSeparation,
    metric_label,
    separation_rows,
    view_value,
)


def test_auc_is_the_probability_that_a_positive_scores_higher():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert auc([1, 2], [1, 2]) == 0.5  # ties count one half
    assert auc([2, 0], [1]) == 0.5
    assert auc([3, 1, 2], [2.5]) == pytest.approx(1 / 3)
    assert math.isnan(auc([], [1.0])) and math.isnan(auc([float("nan")], [1.0]))


def _record(real: dict, controls: dict[str, dict]) -> dict:
    views = lambda values: {q: {v: values.get(f"{q}.{v}", 1.0) for v in ("raw", "normalized", "ratio_of_means",
                                                                        "image_share")}
                            for q in ("user", "response")}
    return {"id": "x", "vas": {"views": views(real), "controls": {k: {"views": views(c)} for k, c in controls.items()}}}


def test_table_gives_one_auc_per_view_and_kind_and_names_the_best():
    sep = ControlSeparation()
    for i in range(10):
        sep.add(_record({"response.image_share": 0.5 + i / 100, "response.raw": float(i)},
                        {"text_only": {"response.image_share": 0.2 + i / 100, "response.raw": 9.0 - i},
                         "blank_image": {"response.image_share": 0.9, "response.raw": float(i)}}))
    sep.add({"id": "unscored"})  # records without VAS are skipped
    table = sep.table()
    assert table["kinds"] == ["text_only", "blank_image"] and table["n"] == {"blank_image": 10, "text_only": 10}
    assert table["auc"]["response.image_share"] == {"blank_image": 0.0, "text_only": 1.0}
    assert table["auc"]["response.raw"]["text_only"] == 0.5  # the same values 0..9 on both sides
    assert table["auc"]["user.raw"] == {"blank_image": 0.5, "text_only": 0.5}  # all equal: ties
    assert set(table["auc"]) == set(METRICS)
    assert table["best"] == max(table["mean_auc"], key=table["mean_auc"].get)
    rows = separation_rows(table, chosen="response.image_share")
    assert rows[0]["View"].startswith("paper VAS") and any("(filter" in r["View"] for r in rows)
    assert {"blank_image", "text_only", "Mean"} <= set(rows[0])


def test_no_controls_no_table_and_views_are_read_safely():
    assert ControlSeparation().table() == {}
    assert view_value({"views": {"user": {"raw": float("nan")}}}, "user.raw") is None
    assert view_value({}, "response.image_share") is None
    assert metric_label("response.image_share") == "image share, response queries"
