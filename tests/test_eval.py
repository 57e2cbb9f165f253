"""trainer.eval: grading of generated outputs and the end-to-end report on a MathVista-style set."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from PIL import Image, ImageDraw

from pipeline.vas import VASItem
from pipeline.vas.scoring import model_vas
from pipeline.vlm import load_model_and_processor
from trainer import eval as evaluation
from trainer.data import eval_examples

ROOT = Path(__file__).resolve().parent.parent


def mathvista_like(n: int = 3) -> datasets.Dataset:
    rows = []
    for i in range(n):
        image = Image.new("RGB", (56, 56), "white")
        ImageDraw.Draw(image).rectangle((10, 10, 10 + 10 * (i + 1), 40), fill="black")
        if i % 2 == 0:
            rows.append({"pid": str(i), "decoded_image": image, "question": "How wide is the bar?",
                         "query": "Question: How wide is the bar? Answer with an integer.",
                         "choices": None, "answer": str(10 * (i + 1)), "answer_type": "integer",
                         "question_type": "free_form"})
        else:
            rows.append({"pid": str(i), "decoded_image": image, "question": "Is the bar wide?",
                         "query": "Question: Is the bar wide?\nChoices:\n(A) yes\n(B) no",
                         "choices": ["yes", "no"], "answer": "no", "answer_type": "text",
                         "question_type": "multi_choice"})
    return datasets.Dataset.from_list(rows)


def test_grading_reads_tags_letters_and_numbers():
    examples = eval_examples(mathvista_like(3))
    assert [e.answer_type for e in examples] == ["number", "choice", "number"]
    assert "Choices:\n(A) yes" in examples[1].prompt and examples[1].prompt.count("(A) yes") == 1
    cases = [(examples[0], "<think>the bar spans 10 px</think><answer>10</answer>", True, True),
             (examples[0], "<think>..</think><answer>12</answer>", False, True),
             (examples[1], "<think>short bar</think><answer>B</answer>", True, True),
             (examples[1], "The bar is short.\nno", True, False),  # untagged: last line
             (examples[2], "", False, False)]
    for example, text, correct, tagged in cases:
        result = evaluation.grade(example, text)
        assert (result["correct"], result["answer_tag"]) == (correct, tagged), text


def test_end_to_end_report(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "bench"
    mathvista_like(3).save_to_disk(str(folder))
    out = tmp_path / "report.json"
    report = evaluation.main(["--model", "tiny", "--data", str(folder), "--split", "train",
                              "--max-samples", "3", "--max-new-tokens", "6", "--max_pixels", "12544",
                              "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["n"] == 3 and len(saved["per_sample"]) == 3
    assert saved["accuracy"] == pytest.approx(sum(s["correct"] for s in saved["per_sample"]) / 3)
    assert saved["vas"]["n_scored"] == 3
    # the report's VAS is the paper's model-level VAS on the same prompts
    model, processor = load_model_and_processor(tiny_model_dir)
    items = [VASItem(key=e.id, images=e.images, question=e.prompt) for e in eval_examples(mathvista_like(3))]
    expected = model_vas(model.eval(), processor, items, max_pixels=12544, progress=False)
    assert saved["vas"]["raw"] == pytest.approx(expected.raw, rel=1e-5)
    assert saved["vas"]["normalized"] == pytest.approx(expected.normalized, rel=1e-5)
    table = capsys.readouterr().out
    assert "| tiny |" in table and f"{saved['vas']['raw']:.2f}" in table
    assert report["per_sample"][0]["id"] == "0"


def test_evaluates_a_trained_checkpoint(tmp_path, monkeypatch):
    from trainer import sft
    from trainer.configs import AGTOConfig, parse_config

    checkpoint = tmp_path / "sft"
    sft.train(parse_config(AGTOConfig, ["--config", str(ROOT / "configs" / "sft_tiny.yaml"), "--output_dir", str(checkpoint),
                                        "--max_steps", "1"]))
    folder = tmp_path / "bench"
    mathvista_like(2).save_to_disk(str(folder))
    monkeypatch.setenv("AVAR_CACHE", str(tmp_path / "cache"))
    report = evaluation.main(["--model", str(checkpoint), "--data", str(folder), "--split", "train",
                              "--skip_accuracy"])
    assert "accuracy" not in report and report["vas"]["n_scored"] == 2
    # the image budget it was trained with (configs/sft_tiny.yaml), not the 262144 default
    assert report["max_pixels"] == 12544 and report["max_pixels_from"] == "checkpoint processor"
    assert (tmp_path / "cache" / "eval" / "sft" / "eval_bench_train.json").exists()  # outside the tree
    assert not (checkpoint / "eval_bench_train.json").exists()


def test_intervention_report_and_checkpoint_defaults(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """One report, the same rows with and without the intervention: the image share of the user
    queries' attention rises with a_img > 0; at a_img = a_sys = 0 nothing changes. max_pixels
    comes from the checkpoint; the default report lands under $AVAR_CACHE, not in the tree."""
    from pipeline.vlm.tiny import TINY_MAX_PIXELS
    folder = tmp_path / "bench"
    mathvista_like(3).save_to_disk(str(folder))
    monkeypatch.setenv("AVAR_CACHE", str(tmp_path / "cache"))
    common = ["--model", "tiny", "--data", str(folder), "--split", "train", "--max-samples", "3",
              "--max-new-tokens", "4", "--intervention"]
    report = evaluation.main([*common, "--a_img", "0.8", "--a_sys", "0.3"])
    assert report["max_pixels"] == TINY_MAX_PIXELS and report["max_pixels_from"] == "checkpoint processor"
    assert report["system_prompt"] == "You are a helpful assistant."
    base, scaled = report["vas"], report["intervention"]["vas"]
    assert scaled["budget"]["image"] > base["budget"]["image"] and scaled["raw"] > base["raw"]
    assert sum(base["budget"].values()) == pytest.approx(1.0, abs=1e-5)
    printed = capsys.readouterr().out
    assert "| as trained |" in printed and "| intervention a_img=0.8 a_sys=0.3 |" in printed
    written = list((tmp_path / "cache" / "eval").rglob("*.json"))
    assert [p.name for p in written] == ["eval_bench_train_intervention-0.8-0.3.json"]

    neutral = evaluation.main([*common, "--a_img", "0", "--a_sys", "0"])
    assert [s["output"] for s in neutral["per_sample"]] == [s["output"] for s in neutral["intervention"]["per_sample"]]
    assert neutral["intervention"]["vas"]["raw"] == pytest.approx(neutral["vas"]["raw"], rel=1e-6)
