"""Every supported VLM family on its tiny offline model: spans, lens exactness, VAS CLI, AGTO SFT,
GRPO + VARS, the intervention and ``trainer.eval``.

``tiny`` (Qwen2.5-VL) has the full suites of the other test files; here the same properties are
checked for Qwen3-VL (dense and MoE: 16 px patches, interleaved M-RoPE, DeepStack, no default
system turn) and Gemma 3 (fixed soft tokens per image, sliding-window layers, the system prompt
folded into the first user turn, ``model`` as the assistant role).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import datasets
import pytest
import torch

from pipeline.lens import AttentionLens
from pipeline.lens.intervention import InterventionConfig, intervene
from pipeline.paper import DEFAULT_SYSTEM_PROMPT
from pipeline.vas.__main__ import main as vas_main
from pipeline.vlm import adapter_for, build_inputs, compute_spans
from pipeline.vlm.inputs import with_system_prompt
from tests.support.images import make_image
from tests.support.lens import EXACT, assert_close, chat_batch, eager_masses, tiny_models
from trainer import eval as evaluation
from trainer import rl, sft
from trainer.configs import AGTOConfig, VARSConfig, parse_config
from trainer.data import toy_table

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("tiny-qwen3-vl", "tiny-qwen3-vl-moe", "tiny-gemma3")
SPAN_NAMES = ("system", "image", "user", "response")


# --- spans against a character-level reference --------------------------------------------------

TURN_PATTERNS = {  # chat format -> (turn regex on the expanded text, role spelling -> our role)
    "qwen": (re.compile(r"<\|im_start\|>(\w+)\n(.*?)(<\|im_end\|>)", re.DOTALL),
             {"system": "system", "user": "user", "assistant": "assistant"}),
    "gemma": (re.compile(r"<start_of_turn>(\w+)\n(.*?)(<end_of_turn>)", re.DOTALL),
              {"user": "user", "model": "assistant"}),
}
LABEL = {"system": "system", "user": "user", "assistant": "response"}


def expanded_text(processor, text: str, n_tokens_per_image: list[int]) -> str:
    """The rendered chat with every image placeholder expanded as the processor does."""
    counts = iter(n_tokens_per_image)
    if adapter_for(processor).chat_format.name == "gemma":
        return text.replace("<start_of_image>", processor.full_image_sequence)
    return re.sub(re.escape("<|image_pad|>"), lambda _: "<|image_pad|>" * next(counts), text)


def character_reference(processor, conversation: list[dict], n_tokens_per_image: list[int]):
    """(ids, labels) from the rendered text: each token gets the label of the character region
    its first character lies in (turn content by role; a folded system prompt is the first user
    turn's text up to the prompt's end), vision tokens by their string. Independent of the
    id-only rules in :mod:`pipeline.vlm.spans`."""
    adapter = adapter_for(processor)
    text = expanded_text(processor, processor.apply_chat_template(conversation, tokenize=False),
                         n_tokens_per_image)
    pattern, roles = TURN_PATTERNS[adapter.chat_format.name]
    region = [None] * len(text)
    first_user = True
    for match in pattern.finditer(text):
        role = roles.get(match.group(1))
        if role is None:
            continue
        start, end = match.span(2)
        for c in range(start, end):
            region[c] = LABEL[role]
        if role == "assistant":
            for c in range(*match.span(3)):
                region[c] = "response"
        if role == "user" and first_user and adapter.chat_format.folded_system:
            prompt = conversation[0]["content"]
            assert text[start:start + len(prompt)] == prompt
            for c in range(start, start + len(prompt)):
                region[c] = "system"
        first_user = first_user and role != "user"
    encoding = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    vision = {adapter.chat_format.image_token: "image", **{t: None for t in adapter.chat_format.vision_tokens}}
    labels = []
    for token_id, (a, _) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        token = processor.tokenizer.convert_ids_to_tokens(token_id)
        labels.append(vision[token] if token in vision else region[a])
    return encoding["input_ids"], labels


def random_conversation(rng: random.Random, n_images: int) -> list[dict]:
    words = ["angle", "x", "What", "is", "the", "bar", "3", "+", "5", "=", "?", "circle", "Look", "again."]
    text = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
    turns = []
    for turn in range(rng.randint(1, 2)):
        content = [{"type": "text", "text": text()}]
        if turn == 0:
            for _ in range(n_images):
                content.insert(rng.randint(0, len(content)), {"type": "image"})
        turns += [{"role": "user", "content": content}, {"role": "assistant", "content": text()}]
    return turns


@pytest.mark.parametrize("alias", ("tiny", *FAMILIES))
def test_spans_match_a_character_reference_in_padded_batches(alias):
    _, _, processor = tiny_models(alias)
    folded = adapter_for(processor).chat_format.folded_system
    rng = random.Random(0)
    for padding_side in ("left", "right"):
        conversations, image_lists = [], []
        for i in range(6):
            n_images = rng.randint(0, 2)
            prompt = rng.choice([DEFAULT_SYSTEM_PROMPT, "Answer briefly.", "Be exact. Look at the image."])
            conversations.append(with_system_prompt(random_conversation(rng, n_images), prompt, folded))
            image_lists.append([make_image(10 * i + j, (rng.randint(40, 120), rng.randint(40, 120)))
                                for j in range(n_images)])
        batch = build_inputs(processor, conversations, image_lists, padding_side=padding_side, max_pixels=32 * 32 * 16)
        spans = compute_spans(batch["input_ids"], batch["attention_mask"], processor)
        image_id = adapter_for(processor).special_tokens(processor).image_pad
        for row, (conversation, images) in enumerate(zip(conversations, image_lists, strict=True)):
            valid = batch["attention_mask"][row].bool()
            ids = batch["input_ids"][row][valid]
            runs = _runs(ids, image_id)  # tokens per image, as the processor expanded them
            ref_ids, labels = character_reference(processor, conversation, runs)
            assert ids.tolist() == ref_ids, "the reference tokenises to the processor's ids"
            for name in SPAN_NAMES:
                got = getattr(spans, name)[row][valid].tolist()
                assert got == [label == name for label in labels], (alias, name, row)
            assert spans.system[row].sum() > 0


def _runs(ids: torch.Tensor, image_id: int) -> list[int]:
    runs, count = [], 0
    for token in ids.tolist() + [-1]:
        if token == image_id:
            count += 1
        elif count:
            runs, count = [*runs, count], 0
    return runs


def test_gemma_system_span_without_a_folded_prompt_is_empty():
    _, _, processor = tiny_models("tiny-gemma3")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is x?"}]}]
    batch = build_inputs(processor, [conversation], [[make_image(0)]])
    spans = compute_spans(batch["input_ids"], batch["attention_mask"], processor)
    assert int(spans.system.sum()) == 0 and int(spans.user.sum()) > 0 and int(spans.image.sum()) == 4
    with pytest.raises(ValueError, match="blank line"):
        with_system_prompt(conversation, "Line one.\n\nLine two.", folded=True)


# --- the lens, exact against eager attention ------------------------------------------------------

@pytest.mark.parametrize("alias", FAMILIES)
def test_lens_matches_eager_values_and_gradients(alias):
    model, eager, processor = tiny_models(alias)
    inputs, spans = chat_batch(processor, "left")
    assert bool((inputs["attention_mask"] == 0).any()) and bool(spans.system.any(1).all())
    layers = list(range(model.config.text_config.num_hidden_layers))
    with torch.no_grad():
        with AttentionLens(model).capture(spans.response, spans.image, spans.system) as cap:
            model(**inputs)
        for keys, name in ((spans.image, "image"), (spans.system, "system")):
            assert_close(cap.dense(name), eager_masses(eager, inputs, spans.response, keys, layers), tol=EXACT)
    # gradients of an AGTO-like loss: lens vs materialised eager attention
    q = spans.user
    valid = q[None, :, None, :].expand(len(layers), -1, model.config.text_config.num_attention_heads, -1)
    loss = lambda img, sys: -(img + 1e-6).log().mean() + (sys + 1e-6).log().mean()
    eager.zero_grad()
    attn = torch.stack(eager(**inputs, output_attentions=True).attentions)
    loss((attn * spans.image[None, :, None, None, :]).sum(-1)[valid],
         (attn * spans.system[None, :, None, None, :]).sum(-1)[valid]).backward()
    expected = {n: p.grad.clone() for n, p in eager.named_parameters() if p.grad is not None}
    model.zero_grad()
    with AttentionLens(model).capture(q, spans.image, spans.system) as cap:
        model(**inputs)
    loss(cap.dense("image")[valid], cap.dense("system")[valid]).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    eager.zero_grad()
    # a gradient of zeros (the last layer's v_proj: SDPA's backward reaches it through the value
    # columns the masses ride on, with nothing to add) is eager's missing one
    nonzero = lambda grads: {n for n, g in grads.items() if g.abs().sum() > 0}
    assert nonzero(got) == nonzero(expected) and got
    for name, reference in expected.items():
        assert_close(got[name], reference, tol=EXACT)


@pytest.mark.parametrize("alias", FAMILIES)
def test_intervention_moves_mass_and_zero_is_a_noop(alias):
    model, _, processor = tiny_models(alias)
    inputs, spans = chat_batch(processor, "right")
    with torch.no_grad():
        plain = model(**inputs).logits
        with intervene(model, spans.image, spans.system, InterventionConfig(a_img=0.0, a_sys=0.0)):
            assert torch.equal(model(**inputs).logits, plain)
        masses = []
        for setting in (None, InterventionConfig(a_img=4.0, a_sys=0.9)):
            with (intervene(model, spans.image, spans.system, setting) if setting else _null()), \
                    AttentionLens(model).capture(spans.user, spans.image, spans.system) as cap:
                model(**inputs)
            valid = cap.query_valid[None, :, None, :].expand_as(cap.image)
            masses.append((float(cap.image[valid].mean()), float(cap.system[valid].mean())))
    (image0, system0), (image1, system1) = masses
    assert image1 > image0 and system1 < system0


def _null():
    import contextlib
    return contextlib.nullcontext()


# --- the command lines ---------------------------------------------------------------------------

def published_folder(tmp_path: Path, n: int = 4) -> Path:
    """Rows in the layout pipeline.publishing writes (data/train-*.parquet)."""
    from pipeline.images import encode_png
    from pipeline.publishing.publish import FEATURES, published_row

    rows = []
    for row in toy_table(n):
        record = {"id": row["id"], "images": [{"bytes": encode_png(row["images"][0])}], "question": row["problem"],
                  "gold_answer": row["answer"], "answer_type": "text", "response": row["response"],
                  "vas": {"raw": 1.0, "normalized": 1.0}, "source": "toy"}
        rows.append(published_row(record))
    folder = tmp_path / "pub"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.mark.parametrize("alias", ("tiny", *FAMILIES))
def test_vas_cli_on_a_published_folder(alias, tmp_path, capsys):
    import polars as pl

    out = tmp_path / "scores.parquet"
    assert vas_main(["--model", alias, "--data", str(published_folder(tmp_path)), "--out", str(out),
                     "--batch-size", "2", "--max-pixels", str(32 * 32 * 16)]) == 0
    scores = pl.read_parquet(out)
    assert scores["status"].to_list() == ["ok"] * 4
    assert (scores["raw"] > 0).all() and (scores["n_system_tokens"] > 0).all()
    assert set(scores["system_prompt"]) == {DEFAULT_SYSTEM_PROMPT} and scores["random_weights"].all()
    fixed_tokens = alias == "tiny-gemma3"  # no pixel budget applies, none is recorded
    assert scores["max_pixels"].is_null().all() if fixed_tokens else (scores["max_pixels"] == 32 * 32 * 16).all()
    assert "VAS (response) over 4 samples" in capsys.readouterr().out


def _sft_config(alias: str, tmp: Path, *extra: str) -> AGTOConfig:
    return parse_config(AGTOConfig, ["--config", str(ROOT / "configs" / "sft_tiny.yaml"), "--output_dir", str(tmp),
                                     "--model_name_or_path", alias, "--max_steps", "2", *extra])


@pytest.mark.parametrize("alias", FAMILIES)
def test_agto_sft_steps(alias, tmp_path):
    trainer = sft.train(_sft_config(alias, tmp_path / "out", "--freeze_vision_tower", "true"))
    history = trainer.state.log_history
    steps = [e for e in history if "l_enh" in e]
    assert len(steps) == 2 and all(e["agto_samples"] == 2.0 for e in steps)
    assert all(torch.isfinite(torch.tensor([e["l_enh"], e["l_sup"], e["vas"]])).all() for e in steps)
    adapter = adapter_for(trainer.model)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    projectors = {n for n, _ in trainer.model.named_parameters() if any(p in n.split(".") for p in adapter.projector_parts)}
    assert projectors and projectors <= trainable  # DeepStack mergers / Gemma's projector keep training
    assert not any(adapter.is_vision_encoder(n) for n in trainable)
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("alias", FAMILIES)
def test_grpo_vars_steps(alias, tmp_path):
    config = parse_config(VARSConfig, ["--config", str(ROOT / "configs" / "rl_tiny.yaml"), "--output_dir",
                                       str(tmp_path / "rl"), "--model_name_or_path", alias, "--max_steps", "1",
                                       "--max_pixels", str(32 * 32 * 16)])
    trainer = rl.train(config)
    logged = {k: v for e in trainer.state.log_history for k, v in e.items()}
    assert trainer.state.global_step == 1
    assert logged["rewards/r_visual/mean"] >= 0 and logged["r_visual_ungated"] > 0
    assert abs(sum(logged[f"budget/{n}"] for n in ("system", "image", "user", "response", "rest")) - 1) < 1e-4


@pytest.mark.parametrize("alias", FAMILIES)
def test_eval_reports_accuracy_vas_and_the_system_prompt(alias, tmp_path):
    from tests.test_eval import mathvista_like

    folder = tmp_path / "bench"
    mathvista_like(2).save_to_disk(str(folder))
    out = tmp_path / "report.json"
    evaluation.main(["--model", alias, "--data", str(folder), "--split", "train", "--max-new-tokens", "4",
                     "--output", str(out), "--intervention", "--a_img", "0.5", "--a_sys", "0.2"])
    report = json.loads(out.read_text())
    assert report["system_prompt"] == DEFAULT_SYSTEM_PROMPT
    assert report["model_family"] == adapter_for(tiny_models(alias)[2]).family
    assert report["vas"]["n_scored"] == 2 and report["vas"]["raw"] > 0
    assert report["intervention"]["vas"]["raw"] > report["vas"]["raw"]
    if alias == "tiny-gemma3":
        assert report["max_pixels"] is None and report["max_pixels_from"] == "fixed image tokens"


# --- paper-setting configs for Qwen3-VL-8B ---------------------------------------------------------

def _settings(config, skip=("model_name_or_path", "output_dir", "logging_dir", "run_name", "hub_model_id")) -> dict:
    import dataclasses
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}


@pytest.mark.parametrize("kind, cls", [("sft", AGTOConfig), ("rl", VARSConfig)])
def test_qwen3_vl_8b_configs_carry_the_paper_settings_over(kind, cls, tmp_path):
    common = ["--dataset", "toy", "--output_dir", str(tmp_path), "--bf16", "false", "--use_cpu", "true"]
    base = parse_config(cls, ["--config", str(ROOT / "configs" / f"{kind}.yaml"), *common])
    qwen3 = parse_config(cls, ["--config", str(ROOT / "configs" / f"{kind}_qwen3_vl_8b.yaml"), *common])
    assert "qwen3" in qwen3.model_name_or_path.lower().replace("-", "")
    assert _settings(qwen3) == _settings(base)  # the same hyperparameters, system prompt included
    assert qwen3.system_prompt == DEFAULT_SYSTEM_PROMPT


def test_qwen3_vl_8b_synth_config_scores_with_qwen3():
    from flows.config import load_synth_config

    config = load_synth_config(ROOT / "configs" / "synth_qwen3_vl_8b.example.yaml")
    paper = load_synth_config(ROOT / "configs" / "synth.example.yaml")
    assert config.vas.model == "Qwen/Qwen3-VL-8B-Instruct" and config.vas.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert (config.vas.max_pixels, config.vas.queries, config.filter) == (paper.vas.max_pixels, paper.vas.queries,
                                                                          paper.filter)


# --- chat templates with generation markers ---------------------------------------------------------

GEMMA_PROBES = [
    [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is x? "}]},
     {"role": "assistant", "content": "x = 2"},
     {"role": "user", "content": [{"type": "text", "text": "And y?"}, {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "y = 3 "}]}],
    [{"role": "user", "content": "Hi"}],
]


def test_gemma_template_renders_like_the_stock_one_and_replaces_it():
    from pipeline.vlm.processing import chat_template, install_generation_template

    stock = (Path(__file__).parent / "support" / "stock_gemma3.jinja").read_text()
    _, _, processor = tiny_models("tiny-gemma3")
    assert processor.chat_template == chat_template("gemma3")
    for conversation in GEMMA_PROBES:
        for gen in (False, True):
            ours = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
            theirs = processor.apply_chat_template(conversation, chat_template=stock, tokenize=False,
                                                   add_generation_prompt=gen)
            assert ours == theirs
    import copy
    fresh = copy.deepcopy(processor)
    fresh.chat_template = stock
    install_generation_template(fresh, chat_template("gemma3"))
    assert fresh.chat_template == chat_template("gemma3")
    # the generation region is exactly the response span
    text_only = [m if isinstance(m["content"], str) else
                 {**m, "content": [p for p in m["content"] if p["type"] == "text"]} for m in GEMMA_PROBES[0]]
    out = processor.apply_chat_template(text_only, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = torch.tensor(out["input_ids"]).view(-1), torch.tensor(out["assistant_masks"]).view(-1)
    spans = compute_spans(ids, None, processor)
    assert int(mask.sum()) > 0 and spans.response[0].tolist() == mask.bool().tolist()


QWEN_PROBES = [
    [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is x?"}, {"type": "image"}]},
     {"role": "assistant", "content": "x = 2"},
     {"role": "user", "content": "And y?"},
     {"role": "assistant", "content": [{"type": "text", "text": "y = 3"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "No system turn: none is written."}]}],
]


def test_qwen3_vl_template_renders_like_the_stock_one_and_replaces_it():
    import copy

    from pipeline.vlm.processing import chat_template, install_generation_template

    stock = (Path(__file__).parent / "support" / "stock_qwen3_vl.jinja").read_text()
    _, _, processor = tiny_models("tiny-qwen3-vl")
    for conversation in QWEN_PROBES:
        for gen in (False, True):
            for vision_id in (False, True):
                kwargs = {"tokenize": False, "add_generation_prompt": gen, "add_vision_id": vision_id}
                assert processor.apply_chat_template(conversation, **kwargs) == \
                    processor.apply_chat_template(conversation, chat_template=stock, **kwargs)
    assert not processor.apply_chat_template(QWEN_PROBES[1], tokenize=False).startswith("<|im_start|>system")
    fresh = copy.deepcopy(processor)
    fresh.chat_template = stock
    install_generation_template(fresh, chat_template("qwen3_vl"))
    assert fresh.chat_template == chat_template("qwen3_vl")


def test_eval_and_vas_on_a_moe_checkpoint_trained_with_router_logits(tmp_path):
    """TRL leaves output_router_logits on in the checkpoints it saves; generation and scoring
    turn it off (transformers' load-balancing loss breaks cached generation with padding)."""
    from tests.test_eval import mathvista_like

    model, _, processor = tiny_models("tiny-qwen3-vl-moe")
    checkpoint = tmp_path / "moe"
    model.config.text_config.output_router_logits = True
    try:
        model.save_pretrained(checkpoint)
    finally:
        model.config.text_config.output_router_logits = False
    processor.save_pretrained(checkpoint)
    mathvista_like(3).save_to_disk(str(tmp_path / "bench"))
    report = evaluation.main(["--model", str(checkpoint), "--data", str(tmp_path / "bench"), "--split", "train",
                              "--max-new-tokens", "4", "--batch-size", "3", "--output", str(tmp_path / "r.json")])
    assert report["n"] == 3 and report["vas"]["n_scored"] == 3 and report["model_family"] == "qwen3_vl"


def test_a_model_type_without_an_adapter_is_refused_naming_the_supported_ones(tmp_path, capsys):
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(SystemExit) as exit_info:
        vas_main(["--model", str(tmp_path / "llava"), "--data", str(tmp_path), "--out", str(tmp_path / "s.parquet")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model_type 'llava'" in err and "'gemma3', 'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl', 'qwen3_vl_moe'" in err
    with pytest.raises(ValueError, match="no VLM adapter for model_type 'llava'; supported model types"):
        adapter_for("llava")


def test_the_synthesis_run_accepts_every_tiny_alias_and_refuses_unsupported_folders(tmp_path):
    from pipeline.configio import ConfigError
    from pipeline.vas import VASConfig
    from pipeline.vas.stage import VASStage

    for alias in ("tiny", *FAMILIES):
        VASStage(VASConfig(model=alias)).preflight()  # before any teacher is paid
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConfigError, match="model_type 'llava'; supported model types"):
        VASStage(VASConfig(model=str(tmp_path / "llava"))).preflight()
    with pytest.raises(ConfigError, match="neither a folder nor a Hub id"):
        VASStage(VASConfig(model="tiny-llava")).preflight()
