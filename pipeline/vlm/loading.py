"""Loading a VLM checkpoint (hub id, folder, or ``tiny``) with its processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig
from transformers.processing_utils import ProcessorMixin

from pipeline.vlm import processing
from pipeline.vlm.adapters import _PROCESSOR_TYPES, adapter_for
from pipeline.vlm.processing import (
    QwenVLImageOnlyProcessor,
    install_generation_template,
    saved_processor_class,
)
from pipeline.vlm.reference import REFERENCE_ALIAS, read_manifest, reference_path, verify_reference
from pipeline.vlm.spans import QWEN_CHAT

TINY_ALIAS = "tiny"
"""Model name of the default random-weight test model (a tiny Qwen2.5-VL, :mod:`pipeline.vlm.tiny`),
built on first use; ``tiny-qwen3-vl``, ``tiny-qwen3-vl-moe`` and ``tiny-gemma3`` name the others.
``tiny-shapes`` is the learned one (:mod:`pipeline.vlm.reference`)."""


def resolve_model_name(name_or_path: str | Path) -> str:
    """A tiny alias (``tiny``, ``tiny-qwen3-vl``, ...) -> the built tiny model's folder; the
    learned reference model's alias (``tiny-shapes``) -> its shipped folder, checked against
    this code's recipe; anything else unchanged (the one place the aliases are resolved)."""
    from pipeline.vlm.tiny import TINY_ALIASES
    if str(name_or_path) in TINY_ALIASES:
        from pipeline.vlm.tiny import tiny_model_path
        return str(tiny_model_path(model_type=TINY_ALIASES[str(name_or_path)]))
    if str(name_or_path) == REFERENCE_ALIAS:
        return str(reference_path())
    return str(name_or_path)


def has_random_weights(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` is one of the project's random-weight builds (a tiny alias or a
    folder written by :mod:`pipeline.vlm.tiny`): scores on it exercise the code and carry no
    signal about grounding. A checkpoint trained from it is saved elsewhere, without the
    builder's marker file, and counts as trained."""
    from pipeline.vlm.tiny import DONE_MARKER, TINY_ALIASES
    if str(name_or_path) in TINY_ALIASES:
        return True
    return (Path(name_or_path) / DONE_MARKER).is_file()


def load_model_and_processor(name_or_path: str | Path, dtype: str | torch.dtype = "auto",
                             attn_implementation: str = "sdpa", device_map: Any = None,
                             **model_kwargs: Any) -> tuple[torch.nn.Module, ProcessorMixin]:
    """Model and processor of a checkpoint of a supported family (hub id or local folder).

    ``attn_implementation="eager"`` is needed wherever attention probabilities are read.
    """
    name_or_path = resolve_model_name(name_or_path)
    if read_manifest(name_or_path) is not None:  # a reference-model folder: never load other weights
        verify_reference(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    adapter = adapter_for(config)
    model = adapter.model_cls().from_pretrained(
        str(name_or_path), dtype=dtype, attn_implementation=attn_implementation,
        device_map=device_map, **model_kwargs)
    return model, load_processor(name_or_path)



def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with MoE router logits off. A checkpoint trained by TRL keeps
    ``output_router_logits: true`` in its config (for the load-balancing loss); at inference the
    loss is not wanted, and transformers' Qwen3-VL-MoE computes it wrongly during cached
    generation with padding (a shape error), so scoring and evaluation turn it off."""
    configs = [model.config, getattr(model.config, "text_config", None)]
    for config in configs:
        if config is not None and getattr(config, "output_router_logits", False):
            config.output_router_logits = False
    return model


def load_processor(name_or_path: str | Path, **kwargs: Any) -> ProcessorMixin:
    """The processor of a checkpoint, with its family's chat template (generation markers).

    Qwen folders saved with :class:`QwenVLImageOnlyProcessor` (the tiny models) and any Qwen
    checkpoint on a machine without torchvision load with that class; everything else with the
    stock ``AutoProcessor``. The processor remembers its ``model_type`` (``avar_model_type``),
    so :func:`~pipeline.vlm.adapters.adapter_for` finds the family from it alone.
    """
    model_type = _model_type(name_or_path)
    adapter = adapter_for(model_type)
    saved_class = saved_processor_class(name_or_path)
    if adapter.chat_format is QWEN_CHAT and (saved_class == QwenVLImageOnlyProcessor.__name__
                                             or not processing.torchvision_available()):
        processor = QwenVLImageOnlyProcessor.from_pretrained(str(name_or_path), **kwargs)
    else:
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(str(name_or_path), **kwargs)
    processor.avar_model_type = model_type
    install_generation_template(processor, adapter.chat_template())
    return processor


def _model_type(name_or_path: str | Path) -> str:
    """``model_type`` from the checkpoint's config; a processor-only folder falls back to its
    saved processor class (the project's own class meaning Qwen2.5-VL)."""
    try:
        return AutoConfig.from_pretrained(str(name_or_path)).model_type
    except (OSError, ValueError):
        saved = saved_processor_class(name_or_path)
        if saved == QwenVLImageOnlyProcessor.__name__:
            return "qwen2_5_vl"
        if saved in _PROCESSOR_TYPES:
            return _PROCESSOR_TYPES[saved]
        raise
