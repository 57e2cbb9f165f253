"""Model loading for the trainers: checkpoint + processor (via :mod:`pipeline.vlm`), image
budget, frozen vision tower, LoRA adapters.

``model_name_or_path: tiny`` (or ``tiny-qwen3-vl``, ``tiny-qwen3-vl-moe``, ``tiny-gemma3``) names
a random-weight test model of :mod:`pipeline.vlm.tiny` (built offline on first use), so the tiny
configs run anywhere.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.vlm import TINY_ALIAS, adapter_for, load_model_and_processor, resolve_model_name
from pipeline.vlm.inputs import check_max_pixels, image_token_pixels
from pipeline.vlm.tiny import TINY_ALIASES

logger = logging.getLogger(__name__)
DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def apply_pixel_budget(processor: Any, max_pixels: int | None, min_pixels: int | None = None) -> None:
    """Make every later processor call resize images to at most ``max_pixels`` pixels.

    Qwen-VL image processors read the pixel bounds from ``size`` (``longest_edge`` is the maximum
    area, ``shortest_edge`` the minimum), and TRL's collator calls the processor without kwargs.
    Processors that give every image a fixed number of tokens (Gemma 3) have no pixel budget:
    it is left as the checkpoint has it.
    """
    if max_pixels is None and min_pixels is None:
        return
    if image_token_pixels(processor) is None:
        logger.info("%s: fixed image tokens per image; max_pixels/min_pixels do not apply",
                    type(processor).__name__)
        return
    image_processor = processor.image_processor
    size = dict(image_processor.size)
    if max_pixels is not None:
        check_max_pixels(processor, max_pixels)
        size["longest_edge"] = int(max_pixels)
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    size["shortest_edge"] = min(size.get("shortest_edge") or 0, size["longest_edge"])
    image_processor.size = type(image_processor.size)(**size) if not isinstance(image_processor.size, dict) else size
    for attr, value in (("max_pixels", size["longest_edge"]), ("min_pixels", size["shortest_edge"])):
        if getattr(image_processor, attr, None) is not None:
            setattr(image_processor, attr, value)


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Freeze the vision encoder except its projections into the language model (the merger, and
    Qwen3-VL's DeepStack mergers; Gemma 3's projector sits outside the tower); returns #frozen
    tensors."""
    adapter = adapter_for(model)
    frozen = 0
    for name, param in model.named_parameters():
        if adapter.is_vision_encoder(name):
            param.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise ValueError(f"{type(model).__name__}: no vision-tower parameters found to freeze")
    return frozen


def lora_config(config: Any, model: torch.nn.Module | None = None):
    """LoRA on the language model's projections only (the vision tower's MLP shares the names)."""
    from peft import LoraConfig

    vision = ("visual", "vision_tower") if model is None else adapter_for(model).vision_parts
    names = "|".join(re.escape(m) for m in config.lora_target_modules)
    towers = "|".join(re.escape(v) for v in vision)
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=rf"^(?!.*\b({towers})\b).*\.({names})$", task_type="CAUSAL_LM")


def load_for_training(config: Any) -> tuple[torch.nn.Module, Any, Any]:
    """``(model, processor, peft_config or None)`` as the config asks."""
    path = resolve_model_name(config.model_name_or_path)
    if not Path(path).exists() and "/" not in path:
        raise FileNotFoundError(f"model_name_or_path={config.model_name_or_path!r}: no such folder "
                                f"(and not a Hub id); tiny test models: {sorted(TINY_ALIASES)} "
                                f"({TINY_ALIAS!r} is a Qwen2.5-VL)")
    model, processor = load_model_and_processor(
        path, dtype=resolve_dtype(config.torch_dtype), attn_implementation=config.attn_implementation or "sdpa")
    apply_pixel_budget(processor, config.max_pixels, config.min_pixels)
    if config.freeze_vision_tower:
        logger.info("froze %d vision-tower tensors", freeze_vision_tower(model))
    return model, processor, lora_config(config, model) if config.use_peft else None


def fit_and_save(trainer: Any, resume_from_checkpoint: Any) -> Any:
    """Train (resuming from the last checkpoint for ``"true"``/``"last"`` or a path), then save
    the model and, on the main process, the processor next to it."""
    resume = resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(trainer.args.output_dir)
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(trainer.args.output_dir)
    return trainer
