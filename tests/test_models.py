"""The tiny offline VLM, loading, the image-only processor, the chat template, build_inputs."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline.vlm import (
    QwenVLImageOnlyProcessor,
    adapter_for,
    build_inputs,
    build_tiny_model,
    chat_template,
    load_model_and_processor,
    load_processor,
)
from pipeline.vlm import tiny as tiny_vlm
from tests.support.images import make_image

# The chat template shipped with Qwen/Qwen2.5-VL-7B-Instruct (and Qwen2-VL-7B-Instruct).
STOCK_QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is x?"}]},
     {"role": "assistant", "content": "<think>x = 2</think><answer>2</answer>"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "text", "text": "Two: "}, {"type": "image"},
                                  {"type": "image", "image": "ignored"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
     {"role": "user", "content": "Sure?"}],
    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Clip."}]}],
]


def test_tiny_model_is_built_once_with_all_files(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "chat_template.jinja", tiny_vlm.DONE_MARKER} <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    text = config["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["num_key_value_heads"]) == (64, 4, 4, 2)
    assert sum(text["rope_parameters"]["mrope_section"]) == 64 // 4 // 2
    assert config["vision_config"]["out_hidden_size"] == 64
    assert tiny_vlm.tiny_model_path() == tiny_model_dir


def test_build_is_seeded_and_deterministic(tiny_model_dir, tmp_path):
    rebuilt = build_tiny_model(tmp_path / "again", seed=0)
    assert (rebuilt / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
    a, b = load_file(rebuilt / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        build_tiny_model(rebuilt)


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_vlm, "_build_model", explode)
    with pytest.raises(RuntimeError, match="boom"):
        build_tiny_model(tmp_path / "tiny", seed=0)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_first_use_builds_once(tmp_path, monkeypatch):
    calls = []

    def slow_build(out_dir, seed=0, model_type="qwen2_5_vl"):
        calls.append(out_dir)
        time.sleep(0.3)
        out_dir.mkdir()
        (out_dir / tiny_vlm.DONE_MARKER).write_text("{}")
        return out_dir

    monkeypatch.setattr(tiny_vlm, "build_tiny_model", slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(tiny_vlm.tiny_model_path(tmp_path)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
    monkeypatch.setenv("AVAR_CACHE", str(tmp_path))
    assert tiny_vlm.tiny_model_path() == results[0] and len(calls) == 1


def test_reload_and_forward_with_pixel_values(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    assert isinstance(processor, QwenVLImageOnlyProcessor)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    batch = build_inputs(processor, [CONVERSATIONS[0]], [[make_image(0, (100, 130))]])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_generate_with_left_padding_and_mixed_images(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    conversations = [CONVERSATIONS[0][:1], [{"role": "user", "content": "Text only, longer."}]]
    batch = build_inputs(processor, conversations, [[make_image(1)], []],
                         add_generation_prompt=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, :batch["input_ids"].shape[1]], batch["input_ids"])


def test_processor_round_trip(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    again = load_processor(tmp_path)
    assert type(again) is QwenVLImageOnlyProcessor and again.chat_template == chat_template()
    images = [[make_image(3, (77, 55)), make_image(4)]]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "Same?"}]}]
    a, b = (build_inputs(p, [conversation], images) for p in (tiny_processor, again))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_image_pads_follow_grid_and_max_pixels(tiny_processor):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = []
    for max_pixels in (28 * 28 * 4, 28 * 28 * 16, None):
        batch = build_inputs(tiny_processor, [conversation], [[make_image(0, (400, 300))]],
                             max_pixels=max_pixels)
        n_pads = int((batch["input_ids"] == pad).sum())
        assert n_pads == int(batch["image_grid_thw"].prod()) // 4
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod())
        counts.append(n_pads)
    assert counts[0] <= 4 < counts[1] <= 16 < counts[2] <= 64


def test_template_renders_like_stock_qwen_template(tiny_processor):
    for conversation in CONVERSATIONS:
        for gen in (False, True):
            for vision_id in (False, True):
                kwargs = {"tokenize": False, "add_generation_prompt": gen,
                          "add_vision_id": vision_id}
                ours = tiny_processor.apply_chat_template(conversation, **kwargs)
                stock = tiny_processor.apply_chat_template(
                    conversation, chat_template=STOCK_QWEN_VL_TEMPLATE, **kwargs)
                assert ours == stock


def test_stock_template_is_swapped_for_generation_markers(tiny_model_dir):
    processor = QwenVLImageOnlyProcessor.from_pretrained(str(tiny_model_dir))
    processor.chat_template = STOCK_QWEN_VL_TEMPLATE
    from pipeline.vlm.processing import install_generation_template
    install_generation_template(processor)
    assert processor.chat_template == chat_template()
    processor.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    install_generation_template(processor)  # renders differently: left alone
    assert "generation" not in processor.chat_template


def test_build_inputs_padding_and_generation_prompt(tiny_processor):
    conversations = [CONVERSATIONS[0][:1], [{"role": "user", "content": "No image, longer text."}]]
    for side in ("left", "right"):
        batch = build_inputs(tiny_processor, conversations, [[make_image(0)], []],
                             add_generation_prompt=True, padding_side=side)
        mask = batch["attention_mask"]
        padded_row = int(mask.sum(dim=1).argmin())
        assert mask[padded_row, 0 if side == "left" else -1] == 0
        assert batch["image_grid_thw"].shape == (1, 3)
        real = tiny_processor.tokenizer.decode(batch["input_ids"][0][mask[0].bool()])
        assert real.endswith("<|vision_end|>What is x?<|im_end|>\n<|im_start|>assistant\n")
    text_only = build_inputs(tiny_processor, [conversations[1]])
    assert "pixel_values" not in text_only


@pytest.mark.parametrize("conversations,images,match", [
    ([CONVERSATIONS[0]], [[]], "1 image parts but 0 images"),
    ([CONVERSATIONS[0]], [[make_image(0)], []], "1 conversations but 2 image lists"),
    ([CONVERSATIONS[2]], [[]], "video parts are not supported"),
    ([[{"role": "user", "content": "inject <|im_end|> here"}]], None, "special token"),
    ([[{"role": "user"}]], None, "conversation 0, message 0: expected a dict"),
    ([[{"role": "user", "content": ["plain"]}]], None, "part 0: expected a dict"),
    ([[{"role": "user", "content": {"text": "x"}}]], None, "content must be a string or a list"),
    ([[{"role": "user", "content": [{"type": "text", "text": 3}]}]], None, "text must be a string"),
    ([[{"role": "user", "content": "fake <|image_pad|> pad"}]], None, "special token"),
    ([[]], None, "non-empty list"),
    ([], None, "at least one conversation"),
])
def test_build_inputs_refuses_bad_input(tiny_processor, conversations, images, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_inputs(tiny_processor, conversations, images)


def test_build_inputs_accepts_bytes_and_other_modes(tiny_processor):
    from pipeline.images import encode_png
    image = make_image(5, (90, 70))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "?"}]}]
    from_pil = build_inputs(tiny_processor, [conversation], [[image, image.convert("L")]])
    from_bytes = build_inputs(tiny_processor, [conversation],
                              [[encode_png(image), image.convert("RGBA")]])
    assert torch.equal(from_pil["input_ids"], from_bytes["input_ids"])
    first = int(from_pil["image_grid_thw"][0].prod())
    assert torch.equal(from_pil["pixel_values"][:first], from_bytes["pixel_values"][:first])
    with pytest.raises(TypeError, match="PIL images or encoded bytes"):
        build_inputs(tiny_processor, [conversation], [[image, "not an image"]])
    with pytest.raises(ValueError, match="max_pixels"):
        build_inputs(tiny_processor, [conversation], [[image, image]], max_pixels=0)


def test_loads_a_stock_layout_checkpoint_without_torchvision(tiny_model_dir, tmp_path):
    """A folder laid out like Qwen/Qwen2.5-VL-7B-Instruct (stock processor class, torchvision
    image processor type, chat_template.json) loads with the image-only processor."""
    import shutil
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": STOCK_QWEN_VL_TEMPLATE}))
    model, processor = load_model_and_processor(tmp_path)
    assert isinstance(processor, QwenVLImageOnlyProcessor)
    assert processor.chat_template == chat_template()  # stock template swapped for ours
    batch = build_inputs(processor, [CONVERSATIONS[0]], [[make_image(0, (300, 200))]])
    assert batch["image_grid_thw"].tolist() == [[1, 14, 22]]  # stock smart_resize of 300x200
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_stock_auto_processor_is_used_when_torchvision_is_there(tmp_path, monkeypatch):
    import transformers

    from pipeline.vlm import processing as models
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Qwen2_5_VLProcessor"}))
    stock = QwenVLImageOnlyProcessor.from_pretrained(str(tiny_vlm.tiny_model_path()))
    stock.chat_template = STOCK_QWEN_VL_TEMPLATE
    asked = []

    def fake_auto(name, **kwargs):
        asked.append(name)
        return stock

    monkeypatch.setattr(models, "torchvision_available", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fake_auto)
    processor = load_processor(tmp_path)
    assert asked == [str(tmp_path)] and processor is stock
    assert processor.chat_template == chat_template()


def test_build_inputs_refuses_bad_padding_side(tiny_processor):
    with pytest.raises(ValueError, match="padding_side"):
        build_inputs(tiny_processor, [CONVERSATIONS[1]], [[make_image(0), make_image(1)]],
                     padding_side="middle")


def test_image_only_processor_refuses_videos(tiny_processor):
    with pytest.raises(ValueError, match="images only"):
        tiny_processor(text=["hi"], videos=[[make_image(0)]])


def test_adapter_registry(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    adapter = adapter_for(model)
    assert adapter is adapter_for(processor) is adapter_for(model.config) is adapter_for("qwen2_5_vl")
    assert adapter.template_system_prompt == "You are a helpful assistant."
    via_adapter = adapter.build_inputs(processor, [CONVERSATIONS[0]], [[make_image(0)]])
    direct = build_inputs(processor, [CONVERSATIONS[0]], [[make_image(0)]])
    assert torch.equal(via_adapter["input_ids"], direct["input_ids"])
    assert adapter.special_tokens(processor).image_pad == model.config.image_token_id
    assert adapter_for("qwen2_vl").model_cls().__name__ == "Qwen2VLForConditionalGeneration"
    with pytest.raises(ValueError, match="no VLM adapter.*supported model types"):
        adapter_for("llava")


def test_qwen2_vl_variant_and_overrides(tmp_path):
    path = build_tiny_model(tmp_path / "q2", model_type="qwen2_vl", num_hidden_layers=2,
                            vision={"depth": 1})
    model, processor = load_model_and_processor(path, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers == 2
    batch = build_inputs(processor, [CONVERSATIONS[0]], [[make_image(0)]])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model(tmp_path / "bad", hidden_size=72)
    with pytest.raises(ValueError, match="unsupported tiny model_type"):
        build_tiny_model(tmp_path / "bad2", model_type="llava")
