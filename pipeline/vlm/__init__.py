"""Vision-language models: processors, per-family adapters, batched inputs, spans, tiny models.

- :mod:`~pipeline.vlm.loading`: :func:`load_model_and_processor` for a hub id, a folder or a
  tiny alias (``tiny``, ``tiny-qwen3-vl``, ``tiny-qwen3-vl-moe``, ``tiny-gemma3``: random-weight
  test models of :mod:`~pipeline.vlm.tiny`, built offline);
- :mod:`~pipeline.vlm.processing`: processors (image-only Qwen-VL without torchvision) and chat
  templates with generation markers;
- :mod:`~pipeline.vlm.adapters`: what is family-specific (Qwen2/2.5-VL, Qwen3-VL dense and MoE,
  Gemma 3), found by ``model_type``;
- :mod:`~pipeline.vlm.inputs`: :func:`build_inputs`, conversations + images -> a padded batch,
  and the explicit system turn (:func:`~pipeline.vlm.inputs.with_system_prompt`);
- :mod:`~pipeline.vlm.spans`: the S / I / U / R token spans, from token ids only.
"""

from pipeline.vlm.adapters import ADAPTERS, VLMAdapter, adapter_for
from pipeline.vlm.inputs import build_inputs
from pipeline.vlm.loading import (
    TINY_ALIAS,
    load_model_and_processor,
    load_processor,
    resolve_model_name,
)
from pipeline.vlm.processing import QwenVLImageOnlyProcessor, chat_template
from pipeline.vlm.spans import ChatFormat, Spans, SpecialTokens, compute_spans
from pipeline.vlm.tiny import build_tiny_model, tiny_model_path

__all__ = [
    "ADAPTERS",
    "TINY_ALIAS",
    "ChatFormat",
    "QwenVLImageOnlyProcessor",
    "Spans",
    "SpecialTokens",
    "VLMAdapter",
    "adapter_for",
    "build_inputs",
    "build_tiny_model",
    "chat_template",
    "compute_spans",
    "load_model_and_processor",
    "load_processor",
    "resolve_model_name",
    "tiny_model_path",
]
