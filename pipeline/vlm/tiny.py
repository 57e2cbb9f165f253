"""Tiny random-weight VLMs of every supported family, built offline in a few seconds.

The default (``tiny``) is a Qwen2.5-VL: the real architecture (vision tower with window
attention, patch merger, GQA text model with M-RoPE), a byte-level BPE tokenizer trained here on
a small embedded corpus with the Qwen-VL special tokens, and the Qwen-VL chat template - so
token ids, spans, image-token counts and attention shapes behave exactly as with the 7B model,
only smaller and meaningless. ``tiny-qwen3-vl``, ``tiny-qwen3-vl-moe`` and ``tiny-gemma3`` are
the same for the other families (:mod:`pipeline.vlm.tiny_families`); :data:`TINY_ALIASES` names
them all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from pipeline.vlm.tiny_tokenizer import (
    QWEN_VL_SPECIAL_TOKENS,
    round_up,
    train_tokenizer,
)

TINY_VERSION = "v3"  # bump when the build changes: a new folder name forces a rebuild
DONE_MARKER = "avar_tiny_model.json"
TINY_ALIASES = {"tiny": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl",
                "tiny-qwen3-vl-moe": "qwen3_vl_moe", "tiny-gemma3": "gemma3"}
"""Model names of the tiny random-weight models -> their ``model_type``."""

TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 8192}
TINY_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
               "window_size": 112, "fullatt_block_indexes": [1]}
TINY_MAX_PIXELS = 28 * 28 * 64  # at most 64 image tokens per image by default
TINY_MIN_PIXELS = 28 * 28 * 4

def tiny_model_path(cache_dir: str | Path | None = None, model_type: str = "qwen2_5_vl") -> Path:
    """The tiny model folder of a family, built on first use and reused afterwards.

    ``cache_dir`` defaults to ``$AVAR_CACHE`` or ``~/.cache/avar``. The build happens in a
    temporary folder renamed into place, under a file lock, so concurrent processes neither
    both build nor ever see a half-written model.
    """
    if model_type not in TINY_ALIASES.values():
        raise ValueError(f"no tiny model for model_type {model_type!r}; tiny models: {sorted(TINY_ALIASES.values())}")
    root = Path(cache_dir or os.environ.get("AVAR_CACHE") or Path.home() / ".cache" / "avar")
    name = "qwen2.5-vl" if model_type == "qwen2_5_vl" else model_type.replace("_", "-")
    final = root / "models" / f"tiny-{name}-{TINY_VERSION}"
    if (final / DONE_MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / DONE_MARKER).is_file():
            return final
        if final.exists():  # a folder without marker is debris of an older scheme: replace
            shutil.rmtree(final)
        build_tiny_model(final, seed=0, model_type=model_type)
    return final


def build_tiny_model(out_dir: str | Path, seed: int = 0, model_type: str = "qwen2_5_vl",
                     vocab_size: int = 4096, max_pixels: int | None = None,
                     min_pixels: int | None = None, vision: dict | None = None,
                     corpus: tuple[str, ...] = (), **text_overrides: Any) -> Path:
    """Build a seeded random-weight VLM with tokenizer and processor into ``out_dir``.

    Text-model fields (``hidden_size``, ``num_hidden_layers``, ...) come as keyword overrides,
    vision-tower fields as ``vision={...}``. M-RoPE sections are derived from the head size.
    ``model_type`` is one of :data:`TINY_ALIASES`' values or ``qwen2_vl``; ``max_pixels`` /
    ``min_pixels`` bound the image area of the Qwen families (64 and 4 image tokens by default).
    ``corpus`` adds lines to the tokenizer's training text (Qwen2/2.5-VL), so the words a model
    will be trained on become whole tokens.
    Written atomically (temp folder, rename); an existing ``out_dir`` is an error.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"tiny model folder {out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if model_type in ("qwen2_5_vl", "qwen2_vl"):
            vision = {**TINY_VISION, **(vision or {})}
            model, processor = _build_qwen2(model_type, seed, vocab_size, vision, text_overrides,
                                            max_pixels or TINY_MAX_PIXELS, min_pixels or TINY_MIN_PIXELS, corpus)
        else:
            if corpus:
                raise ValueError(f"corpus: only the Qwen2/2.5-VL builds take a tokenizer corpus, not {model_type}")
            from pipeline.vlm.tiny_families import build_family
            model, processor, vision = build_family(model_type, seed, vocab_size, vision or {},
                                                    text_overrides, max_pixels, min_pixels)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        marker = {"version": TINY_VERSION, "seed": seed, "model_type": model_type,
                  "vocab_size": vocab_size, "vision": vision, "text_overrides": text_overrides,
                  "corpus_lines": len(corpus)}
        (tmp / DONE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _build_qwen2(model_type: str, seed: int, vocab_size: int, vision: dict, text_overrides: dict,
                 max_pixels: int, min_pixels: int, corpus: tuple[str, ...] = ()):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from pipeline.vlm.processing import QwenVLImageOnlyProcessor, chat_template

    tokenizer = train_tokenizer(vocab_size=vocab_size, seed=seed, extra_lines=tuple(corpus))
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=vision["patch_size"],
        merge_size=vision["spatial_merge_size"], temporal_patch_size=vision["temporal_patch_size"])
    processor = QwenVLImageOnlyProcessor(image_processor, tokenizer, chat_template=chat_template())
    tokenizer.chat_template = processor.chat_template
    return _build_model(tokenizer, model_type, seed, vision, text_overrides), processor


def _build_model(tokenizer, model_type: str, seed: int, vision: dict, text_overrides: dict):
    import transformers

    text = {**TINY_TEXT, **text_overrides}
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL_TOKENS}
    text.update(vocab_size=round_up(len(tokenizer), 64), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters=mrope_parameters(text["hidden_size"], text["num_attention_heads"]))
    common = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"],
              "vision_end_token_id": ids["<|vision_end|>"], "text_config": text}
    if model_type == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            vision_config={**vision, "out_hidden_size": text["hidden_size"]}, **common)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    elif model_type == "qwen2_vl":
        config = transformers.Qwen2VLConfig(vision_config={
            "depth": vision["depth"], "embed_dim": vision["hidden_size"],
            "num_heads": vision["num_heads"], "mlp_ratio": 2, "patch_size": vision["patch_size"],
            "spatial_merge_size": vision["spatial_merge_size"],
            "temporal_patch_size": vision["temporal_patch_size"],
            "hidden_size": text["hidden_size"]}, **common)
        cls = transformers.Qwen2VLForConditionalGeneration
    else:
        raise ValueError(f"unsupported tiny model_type {model_type!r}: qwen2_5_vl or qwen2_vl")
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def mrope_parameters(hidden_size: int, num_attention_heads: int) -> dict:
    """Qwen2-VL M-RoPE ``rope_parameters`` for a head size: the stock [2, 3, 3] / 8 split of the
    ``head_dim / 2`` rotary pairs (``[16, 24, 24]`` for Qwen2.5-VL-7B's head size 128)."""
    head_dim = hidden_size // num_attention_heads
    if head_dim % 16:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 16 for M-RoPE sections")
    unit = head_dim // 16
    return {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2 * unit, 3 * unit, 3 * unit]}
