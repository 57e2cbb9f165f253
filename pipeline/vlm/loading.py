"""Loading a VLM checkpoint (hub id, folder, or ``tiny``) with its processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig
from transformers.processing_utils import ProcessorMixin

from pipeline.vlm.adapters import adapter_for
from pipeline.vlm.processing import load_processor

TINY_ALIAS = "tiny"
"""Model name of the random-weight test model (:mod:`pipeline.vlm.tiny`), built on first use."""


def resolve_model_name(name_or_path: str | Path) -> str:
    """``tiny`` -> the built tiny model's folder; anything else unchanged (the one place the
    alias is resolved)."""
    if str(name_or_path) == TINY_ALIAS:
        from pipeline.vlm.tiny import tiny_model_path
        return str(tiny_model_path())
    return str(name_or_path)


def has_random_weights(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` is one of the project's random-weight builds (the ``tiny`` alias
    or a folder written by :mod:`pipeline.vlm.tiny`): scores on it exercise the code and carry
    no signal about grounding. A checkpoint trained from it is saved elsewhere, without the
    builder's marker file, and counts as trained."""
    if str(name_or_path) == TINY_ALIAS:
        return True
    from pipeline.vlm.tiny import DONE_MARKER
    return (Path(name_or_path) / DONE_MARKER).is_file()


def load_model_and_processor(name_or_path: str | Path, dtype: str | torch.dtype = "auto",
                             attn_implementation: str = "sdpa", device_map: Any = None,
                             **model_kwargs: Any) -> tuple[torch.nn.Module, ProcessorMixin]:
    """Model and processor of a Qwen2.5-VL / Qwen2-VL checkpoint (hub id or local folder).

    ``attn_implementation="eager"`` is needed wherever attention probabilities are read.
    """
    name_or_path = resolve_model_name(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    adapter = adapter_for(config)
    model = adapter.model_cls().from_pretrained(
        str(name_or_path), dtype=dtype, attn_implementation=attn_implementation,
        device_map=device_map, **model_kwargs)
    return model, load_processor(name_or_path)

