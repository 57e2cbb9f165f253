"""The paper's claims in miniature (trainer/claims.py): the probe set and one claim end to end on
a small probe. The full runs (LAL over checkpoints, AGTO from a half-trained checkpoint) train
models for minutes; their outputs are committed in docs/claims/ with the commands that made them."""

from __future__ import annotations

import json

from pipeline.vlm.reference import REFERENCE_RECIPE
from trainer import claims, reference
from trainer.data import eval_examples, load_table


def test_the_probe_holds_held_out_questions_the_evaluator_reads(tmp_path):
    folder = reference.write_probe(REFERENCE_RECIPE, tmp_path / "probe", n=12, tasks=("describe", "count"))
    examples = eval_examples(load_table(str(folder), split="train"), format_hint=False)
    assert len(examples) == 12 and {e.prompt for e in examples} <= {"Describe the shapes.", "How many shapes are there?"}
    table = load_table(str(folder), split="train")
    assert set(table["task"]) == {"describe", "count"} and all(len(row["images"]) == 1 for row in table)


def test_the_intervention_claim_writes_its_report_and_moves_the_image_share(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "PROBE_SIZE", 16)
    monkeypatch.setattr(claims, "A_IMG", (0.0, 0.6))
    summary = claims.main(["intervention", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    plain, scaled = summary["rows"]
    assert (plain["a_img"], scaled["a_img"]) == (0.0, 0.6)
    assert scaled["image_share"] > plain["image_share"]  # image-key logits x 1.6 draw attention to the image
    assert 0.0 <= plain["accuracy"] <= 1.0
    written = json.loads((tmp_path / "out" / "intervention.json").read_text())
    assert written["rows"] == summary["rows"]
    text = (tmp_path / "out" / "intervention.md").read_text()
    assert "python -m trainer.claims intervention" in text and "| a_img |" in text
    assert (tmp_path / "out" / "intervention.png").read_bytes()[:4] == b"\x89PNG"
