"""AGTO SFT on the tiny Qwen2.5-VL: loss parts, the attention effect, resume, multi-process.

The attention-effect test uses alpha = beta = 1.0 (paper: 0.15) and lr 1e-3 on 16 drawn-shape
samples for 8 steps so that the effect is well above run-to-run noise on a random-weight model;
0.15 moves the same statistic in the same direction, by less.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from pipeline.lens import AttentionLens
from pipeline.vlm import build_inputs
from pipeline.vlm.spans import compute_spans
from trainer import sft
from trainer.configs import AGTOConfig, ModelDataFields, parse_config
from trainer.data import (
    load_table,
    rl_dataset,
    sft_dataset,
    strip_nulls,
    toy_table,
    with_image_placeholders,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "sft_tiny.yaml")


def config(tmp: Path, *overrides: str) -> AGTOConfig:
    return parse_config(AGTOConfig, ["--config", TINY, "--output_dir", str(tmp), *overrides])


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def image_attention(model, processor) -> tuple[float, float]:
    """Mean attention mass of user queries on image / system keys (all layers and heads), held-out toy rows."""
    table = load_table("toy", split="eval", max_samples=8)
    conversations = [strip_nulls(m)[:1] for m in sft_dataset(table)["messages"]]
    batch = build_inputs(processor, conversations, [row["images"] for row in table], add_generation_prompt=True)
    spans = compute_spans(batch["input_ids"], batch["attention_mask"], processor)
    model.eval()
    with torch.no_grad(), AttentionLens(model).capture(spans.user, image_mask=spans.image,
                                                       system_mask=spans.system) as cap:
        model(**batch)
    valid = cap.query_valid[None, :, None, :].expand_as(cap.image).float()
    return float((cap.image * valid).sum() / valid.sum()), float((cap.system * valid).sum() / valid.sum())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Plain SFT (with the lens forbidden) and AGTO from the same seed and data."""
    out = {}
    common = ("--max_steps", "8", "--max_train_samples", "16")
    with pytest.MonkeyPatch.context() as patch:
        def forbidden(*args, **kwargs):
            raise AssertionError("plain SFT must not run the attention lens")
        patch.setattr(AttentionLens, "capture", forbidden)
        out["plain"] = sft.train(config(tmp_path_factory.mktemp("plain"), "--alpha", "0", "--beta", "0", *common))
    out["agto"] = sft.train(config(tmp_path_factory.mktemp("agto"), "--alpha", "1.0", "--beta", "1.0", *common))
    return out


def test_help_shows_every_avar_field(capsys):
    with pytest.raises(SystemExit):
        parse_config(AGTOConfig, ["--help"])
    text = capsys.readouterr().out
    own = [f for f in AGTOConfig.__dataclass_fields__ if f in ModelDataFields.__dataclass_fields__
           or f in ("alpha", "beta", "agto_layers", "eps")]
    for name in own:
        assert f"--{name}" in text, name
        assert AGTOConfig.__dataclass_fields__[name].metadata.get("help"), f"{name} has no help text"


def test_config_refuses_bad_values(tmp_path):
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        config(tmp_path, "--alpha", "-0.1")
    with pytest.raises(SystemExit, match="model_name_or_path"):
        parse_config(AGTOConfig, ["--output_dir", str(tmp_path), "--dataset", "toy", "--use_cpu", "--bf16", "false"])


def test_collator_trains_on_response_tokens_only(tiny_processor):
    table = sft_dataset(toy_table(3))
    collator = sft.AVARVisionCollator(processor=tiny_processor, assistant_only_loss=True)
    batch = collator([dict(row) for row in table])
    spans = compute_spans(batch["input_ids"], batch["attention_mask"], tiny_processor)
    assert torch.equal(batch["labels"] != -100, spans.response)
    assert int(spans.image.sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4  # 2x2 merge


def test_sft_lowers_lm_loss(runs):
    for name, trainer in runs.items():
        losses = logged(trainer, "lm_loss")
        assert len(losses) == 8, name
        assert losses[-1] < losses[0] - 0.5, (name, losses)
        assert trainer.state.global_step == 8


def test_loss_parts_logged_only_with_agto(runs):
    assert not logged(runs["plain"], "l_enh") and not logged(runs["plain"], "vas")
    enh, sup, vas = (logged(runs["agto"], k) for k in ("l_enh", "l_sup", "vas"))
    assert len(enh) == len(sup) == len(vas) == 8
    assert all(e > 0 for e in enh) and all(s < 0 for s in sup) and all(v > 0 for v in vas)
    # the objective pushes image attention up and system attention down during training
    assert enh[-1] < enh[0] and sup[-1] < sup[0]
    # the attention budget of the user queries beside VAS: shares that sum to 1, image share up
    shares = {k: logged(runs["agto"], f"budget/{k}") for k in ("system", "image", "user", "response", "rest")}
    assert all(len(v) == 8 for v in shares.values()) and not logged(runs["plain"], "budget/image")
    assert all(abs(sum(step) - 1) < 1e-4 for step in zip(*shares.values(), strict=True))
    assert shares["image"][-1] > shares["image"][0] and len(logged(runs["agto"], "vas_ratio_of_means")) == 8
    losses, lm = logged(runs["agto"], "loss"), logged(runs["agto"], "lm_loss")
    for total, lm_part, e, s in zip(losses, lm, enh, sup):
        assert total == pytest.approx(lm_part + e + s, abs=2e-3)


def test_agto_raises_measured_image_attention(runs):
    plain_image, plain_system = image_attention(runs["plain"].model, runs["plain"].processing_class)
    agto_image, agto_system = image_attention(runs["agto"].model, runs["agto"].processing_class)
    assert agto_image > plain_image + 0.01, (agto_image, plain_image)
    assert agto_system < plain_system, (agto_system, plain_system)


def test_samples_without_images_skip_agto(tmp_path):
    rows = []
    for i, row in enumerate(toy_table(4)):
        if i % 2:  # text-only rows: the question without its image
            row["images"] = []
            row["messages"] = with_image_placeholders([{"role": "user", "content": row["problem"]},
                                                  {"role": "assistant", "content": row["response"]}], 0)
        rows.append(row)
    folder = tmp_path / "mixed"
    datasets.Dataset.from_list(rows, features=toy_table(1).features).save_to_disk(str(folder))
    trainer = sft.train(config(tmp_path / "out", "--dataset", str(folder), "--max_steps", "2"))
    assert logged(trainer, "agto_samples") == [1.0, 1.0]  # one imaged sample per batch of 2
    assert len(logged(trainer, "lm_loss")) == 2


def test_resume_continues_step_count(tmp_path):
    first = sft.train(config(tmp_path, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"))
    assert first.state.global_step == 2
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "optimizer.pt").exists()
    resumed = sft.train(config(tmp_path, "--max_steps", "4", "--resume_from_checkpoint", str(checkpoint)))
    assert resumed.state.global_step == 4
    assert [e["step"] for e in resumed.state.log_history if "lm_loss" in e] == [1, 2, 3, 4]


def test_accelerate_launch_two_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "trainer.sft",
               "--config", TINY, "--output_dir", str(out), "--max_steps", "2"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 2 steps" in result.stderr
    assert (out / "model.safetensors").exists() and (out / "processor_config.json").exists()


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    plain = sft.train(config(tmp_path / "a", "--max_steps", "2", "--alpha", "1.0", "--beta", "1.0"))
    checkpointed = sft.train(config(tmp_path / "b", "--max_steps", "2", "--alpha", "1.0", "--beta", "1.0",
                                    "--gradient_checkpointing", "true"))
    for key in ("lm_loss", "l_enh", "l_sup"):
        assert logged(checkpointed, key) == pytest.approx(logged(plain, key), rel=1e-4), key


def test_paper_config_parses_to_paper_settings(tmp_path):
    paper = parse_config(AGTOConfig, ["--config", str(ROOT / "configs" / "sft.yaml"), "--dataset", "toy",
                                      "--output_dir", str(tmp_path), "--bf16", "false", "--use_cpu", "true"])
    assert (paper.alpha, paper.beta, paper.eps, paper.agto_layers) == (0.15, 0.15, 1e-6, None)
    assert (paper.num_train_epochs, paper.learning_rate, paper.max_length, paper.max_pixels) == (20, 5e-6, 8192, 262144)
    assert paper.per_device_train_batch_size * paper.gradient_accumulation_steps * 8 == 512
    assert paper.assistant_only_loss and not paper.use_peft and not paper.freeze_vision_tower


def test_lora_adapts_only_the_language_model(tmp_path):
    trainer = sft.train(config(tmp_path, "--max_steps", "2", "--use_peft", "true", "--lora_r", "4"))
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not any("visual" in name for name in trainable)
    assert {"q_proj", "down_proj"} <= {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert len(logged(trainer, "l_enh")) == 2  # the lens sees through the adapter wrapper


def test_frozen_vision_tower_keeps_its_weights(tmp_path, tiny_model_and_processor):
    before = {k: v.clone() for k, v in tiny_model_and_processor[0].state_dict().items()}
    trainer = sft.train(config(tmp_path, "--max_steps", "2", "--freeze_vision_tower", "true"))
    after = trainer.model.state_dict()
    tower = [k for k in after if ".visual." in f".{k}" and ".merger." not in k]
    merger = [k for k in after if ".merger." in k]
    assert tower and merger
    assert all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in merger)


def test_evaluation_logs_the_parts_and_outputs_come_from_a_separate_pass(tmp_path):
    trainer = sft.build_trainer(config(tmp_path, "--eval_split", "eval", "--max_steps", "1"))
    metrics = trainer.evaluate()
    assert metrics["eval_l_enh"] > 0 and metrics["eval_l_sup"] < 0 and metrics["eval_vas"] > 0
    batch = trainer._prepare_inputs(trainer.data_collator([dict(r) for r in trainer.train_dataset.select(range(2))]))
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert torch.isfinite(loss) and outputs.logits.shape[:2] == batch["input_ids"].shape


def test_trains_on_the_published_layout(tmp_path):
    """Rows made by pipeline.publishing.publish (Hub layout: data/train-*.parquet) load and train as they are."""
    from pipeline.images import encode_png
    from pipeline.publishing.publish import FEATURES, published_row

    rows = []
    for row in toy_table(4):
        record = {"id": row["id"], "images": [{"bytes": encode_png(row["images"][0])}], "question": row["problem"],
                  "gold_answer": row["answer"], "answer_type": "text", "response": row["response"],
                  "vas": {"raw": 1.0, "normalized": 1.0}, "source": "toy"}
        rows.append(published_row(record))
    (tmp_path / "pub" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(
        str(tmp_path / "pub" / "data" / "train-00000-of-00001.parquet"))
    trainer = sft.train(config(tmp_path / "out", "--dataset", str(tmp_path / "pub"), "--max_steps", "2"))
    assert logged(trainer, "agto_samples") == [2.0, 2.0]
    prompt = rl_dataset(load_table(str(tmp_path / "pub")))[0]["prompt"]
    assert [m["role"] for m in prompt] == ["user"] and prompt[0]["content"][0] == {"type": "image"}


def test_malformed_rows_name_the_row_and_field():
    from trainer.data import DataError

    good = toy_table(1)[0]
    two_placeholders = dict(good, messages=with_image_placeholders(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]},
         {"role": "assistant", "content": "a"}], 2))
    cases = [(two_placeholders, "messages", "2 image placeholders for 1 images"),
             (dict(good, messages=None, response=""), "response", "missing"),
             (dict(good, messages=[{"role": "user", "content": "q"}]), "messages", "last turn"),
             (dict(good, messages=[{"role": "robot", "content": "q"}]), "messages[0].role", "expected one of")]
    for row, field_name, message in cases:
        with pytest.raises(DataError, match=message) as error:
            sft_dataset(datasets.Dataset.from_list([row]))
        assert error.value.row_id == good["id"] and error.value.field == field_name


def test_pixel_budget_caps_image_tokens(tiny_processor):
    import copy

    from PIL import Image

    from trainer.models import apply_pixel_budget

    processor = copy.deepcopy(tiny_processor)
    apply_pixel_budget(processor, max_pixels=28 * 28 * 4)
    grid = processor.image_processor(images=[Image.new("RGB", (224, 224))], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // 4 == 4  # 224x224 would be 64 merged patches without the cap
    with pytest.raises(ValueError, match="below one image token"):
        apply_pixel_budget(processor, max_pixels=100)


ACCUMULATION_COMMON = ("--max_steps", "1", "--optim", "sgd", "--learning_rate", "0.5", "--max_grad_norm", "0",
                       "--shuffle_dataset", "false")


def one_update(tmp: Path, layout: tuple, weight: str, token_normalized: bool) -> tuple[dict, dict]:
    trainer = sft.build_trainer(config(tmp, *ACCUMULATION_COMMON, *layout, "--alpha", weight, "--beta", weight))
    trainer.model_accepts_loss_kwargs = token_normalized  # True: the Trainer passes num_items_in_batch
    trainer.train()
    return trainer.model.state_dict(), {k: logged(trainer, k) for k in ("lm_loss", "l_enh", "l_sup")}


@pytest.fixture(scope="module")
def one_big_batch(tmp_path_factory):
    layout = ("--per_device_train_batch_size", "2")  # a single micro-batch: normalization is moot
    return {w: one_update(tmp_path_factory.mktemp(f"big{w}"), layout, w, False) for w in ("0", "1.0")}


@pytest.mark.parametrize("token_normalized", [False, True])
def test_gradient_accumulation_scales_agto_like_one_big_batch(tmp_path, one_big_batch, token_normalized):
    """The AGTO part of one SGD update (AGTO run minus plain run, same data) is the same for two
    micro-batches of 1 as for one batch of 2, whether the Trainer divides the loss by the
    accumulation steps (``token_normalized=False``) or the LM loss is normalized by the token count
    of the whole accumulated batch (True: the AGTO terms must then be divided here). A term not
    spread over the steps would double. (The LM part differs slightly between the two layouts in
    TRL itself, so it is subtracted out.)"""
    layout = ("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2")
    accumulated = {w: one_update(tmp_path / w, layout, w, token_normalized) for w in ("0", "1.0")}
    for key in ("lm_loss", "l_enh", "l_sup"):
        assert accumulated["1.0"][1][key] == pytest.approx(one_big_batch["1.0"][1][key], rel=1e-3), key

    def agto_update(runs):
        return torch.cat([(runs["1.0"][0][k] - runs["0"][0][k]).flatten() for k in runs["0"][0]])

    big, acc = agto_update(one_big_batch), agto_update(accumulated)
    assert float(big.norm()) > 0
    assert float((acc - big).norm() / big.norm()) < 0.05
