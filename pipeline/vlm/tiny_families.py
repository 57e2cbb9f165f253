"""Tiny random-weight Qwen3-VL (dense and MoE) and Gemma 3, for :func:`pipeline.vlm.tiny.build_tiny_model`.

Each keeps what makes its family different from Qwen2.5-VL, at toy size:

- Qwen3-VL: 16-pixel patches (32 px per image token after the 2x2 merge), interleaved M-RoPE,
  q/k norms, DeepStack mergers feeding two decoder layers, a chat template without a default
  system turn; the MoE variant routes every decoder MLP through 4 experts (2 per token).
- Gemma 3: a SigLIP tower, a fixed 4 soft tokens per image (average-pooled patches) between
  ``<start_of_image>`` / ``<end_of_image>`` with blank lines around, sliding-window and global
  layers, the assistant role spelled ``model`` and the system prompt folded into the first user
  turn; the stock ``Gemma3Processor`` (it needs no torchvision).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.vlm.tiny_tokenizer import QWEN_VL_SPECIAL_TOKENS, round_up, train_bpe, train_tokenizer

QWEN3_TEXT = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
              "max_position_embeddings": 8192}
QWEN3_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]}
QWEN3_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
             "decoder_sparse_step": 1}
QWEN3_TOKEN_PIXELS = 32 * 32

GEMMA3_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                         "<start_of_image>", "<end_of_image>", "<image_soft_token>")
GEMMA3_TEXT = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
               "sliding_window": 32, "layer_types": ["sliding_attention", "sliding_attention",
                                                     "full_attention"],
               "max_position_embeddings": 8192}
GEMMA3_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "image_size": 64, "patch_size": 16}
GEMMA3_TOKENS_PER_IMAGE = 4
# Blank-line text, so the BPE learns Gemma's multi-newline tokens (its template ends the folded
# system prompt with one, and the processor puts them around every image).
_GEMMA_LINES = tuple(f"You are a helpful assistant.\n\n{q}\n\nAnswer: {a}" for q, a in
                     (("What is x?", "2"), ("Find the angle at A.", "50"), ("How many balls?", "6"))) * 50


def build_family(model_type: str, seed: int, vocab_size: int, vision: dict, text: dict,
                 max_pixels: int | None, min_pixels: int | None) -> tuple[torch.nn.Module, Any, dict]:
    """``(model, processor, vision config used)`` of a tiny model of ``model_type``."""
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):
        return _qwen3_vl(model_type, seed, vocab_size, {**QWEN3_VISION, **vision}, text,
                         max_pixels or QWEN3_TOKEN_PIXELS * 64, min_pixels or QWEN3_TOKEN_PIXELS * 4)
    if model_type == "gemma3":
        return _gemma3(seed, vocab_size, {**GEMMA3_VISION, **vision}, text)
    raise ValueError(f"unsupported tiny model_type {model_type!r}")


def _qwen3_vl(model_type, seed, vocab_size, vision, text_overrides, max_pixels, min_pixels):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from pipeline.vlm.processing import QwenVLImageOnlyProcessor, chat_template

    tokenizer = train_tokenizer(vocab_size=vocab_size, seed=seed)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=vision["patch_size"],
        merge_size=vision["spatial_merge_size"], temporal_patch_size=vision["temporal_patch_size"],
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = QwenVLImageOnlyProcessor(image_processor, tokenizer, chat_template=chat_template("qwen3_vl"))
    tokenizer.chat_template = processor.chat_template
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL_TOKENS}
    moe = model_type == "qwen3_vl_moe"
    text = {**QWEN3_TEXT, **(QWEN3_MOE if moe else {}), **text_overrides}
    half = text["head_dim"] // 2  # rotary pairs, split over (t, h, w) like the stock [24, 20, 20] of 64
    sections = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    text.update(vocab_size=round_up(len(tokenizer), 64), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                 "mrope_section": sections, "mrope_interleaved": True})
    vision = {**vision, "out_hidden_size": text["hidden_size"]}
    config_cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    cls = (transformers.Qwen3VLMoeForConditionalGeneration if moe
           else transformers.Qwen3VLForConditionalGeneration)
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, processor, vision


def _gemma3(seed, vocab_size, vision, text_overrides):
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from pipeline.vlm.processing import chat_template

    bpe = train_bpe(vocab_size, seed, special_tokens=GEMMA3_SPECIAL_TOKENS, extra_lines=_GEMMA_LINES)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>", "sot_token": "<start_of_turn>",
                              "eot_token": "<end_of_turn>"}, model_max_length=32768)
    vision = dict(vision)
    tokens_per_image = vision.pop("mm_tokens_per_image", GEMMA3_TOKENS_PER_IMAGE)
    size = vision["image_size"]
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size},
                                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=chat_template("gemma3"),
                                             image_seq_length=tokens_per_image)
    tokenizer.chat_template = processor.chat_template
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_SPECIAL_TOKENS}
    text = {**GEMMA3_TEXT, **text_overrides}
    text.update(vocab_size=round_up(len(tokenizer), 64), pad_token_id=ids["<pad>"],
                bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<end_of_turn>"], ids["<eos>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    return model, processor, vision
