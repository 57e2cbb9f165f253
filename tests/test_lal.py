"""trainer.lal: VAS against accuracy over several checkpoints on one probe set, cached per model."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.test_eval import ROOT, mathvista_like
from trainer import lal


def test_correlations():
    assert lal.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert lal.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert lal.spearman([1, 2, 2, 3], [4, 3, 3, 1]) == pytest.approx(-1.0)  # ties share a rank
    assert lal.pearson([1, 1], [2, 3]) != lal.pearson([1, 1], [2, 3])  # NaN: undefined


def test_three_tiny_checkpoints_table_plot_and_cache(tmp_path, monkeypatch):
    from trainer import sft
    from trainer.configs import AGTOConfig, parse_config
    monkeypatch.setenv("AVAR_CACHE", str(tmp_path / "cache"))
    checkpoints = {}
    for name, weights in (("plain", ["--alpha", "0", "--beta", "0"]), ("agto", [])):
        checkpoints[name] = tmp_path / name
        sft.train(parse_config(AGTOConfig, ["--config", str(ROOT / "configs" / "sft_tiny.yaml"), "--max_steps", "2",
                                            "--output_dir", str(checkpoints[name]), *weights]))
    probe = tmp_path / "probe"
    mathvista_like(3).save_to_disk(str(probe))
    out = tmp_path / "lal"
    common = ["--data", str(probe), "--split", "train", "--max-new-tokens", "4", "--max-pixels", "12544",
              "--out", str(out)]
    first = lal.main(["--models", "tiny", str(checkpoints["plain"]), *common])
    assert first["evaluated"] == 2 and first["cached"] == 0
    result = lal.main(["--models", "tiny", str(checkpoints["plain"]), str(checkpoints["agto"]), *common])
    assert result["evaluated"] == 1 and result["cached"] == 2  # the added model cost one evaluation
    rows = result["models"]
    assert [r["model"] for r in rows] == ["tiny", str(checkpoints["plain"]), str(checkpoints["agto"])]
    xs, ys = [r["vas"] for r in rows], [r["accuracy"] for r in rows]
    assert result["pearson_r"] == pytest.approx(lal.pearson(xs, ys), nan_ok=True)
    for row in rows:
        assert sum(row[f"budget_{k}"] for k in ("system", "image", "user", "response", "rest")) == pytest.approx(1, abs=1e-4)
    table = (out / "lal.md").read_text()
    assert "the paper: r = 0.9616" in table and table.count("\n| ") == 3  # a row per model
    assert (out / "lal.csv").read_text().splitlines()[0].startswith("model,n,accuracy,vas")
    assert Image.open(out / "lal.png").size[0] > 300
    assert json.loads((out / "lal.json").read_text())["paper_r"] == 0.9616
