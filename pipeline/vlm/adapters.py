"""What differs between VLM families, behind one small interface, found by ``model_type``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from pipeline.vlm.inputs import build_inputs
from pipeline.vlm.processing import QwenVLImageOnlyProcessor, chat_template
from pipeline.vlm.spans import SpecialTokens


@dataclass(frozen=True)
class VLMAdapter:
    """What differs between VLM families. Qwen2-VL and Qwen2.5-VL share one adapter."""

    family: str
    model_types: tuple[str, ...]
    model_class: str  # transformers class name
    default_system_prompt: str
    chat_template_name: str

    def special_tokens(self, processor_or_tokenizer: Any) -> SpecialTokens:
        return SpecialTokens.from_tokenizer(processor_or_tokenizer)

    def model_cls(self):
        import transformers
        return getattr(transformers, self.model_class)

    def chat_template(self) -> str:
        return chat_template(self.chat_template_name)

    def build_inputs(self, processor: ProcessorMixin, conversations: list[list[dict]],
                     images: list[list[Image.Image | bytes]] | None = None,
                     **kwargs: Any) -> BatchFeature:
        """Batched chat inputs for this family (see the module-level :func:`build_inputs`);
        a family whose processor differs overrides this."""
        return build_inputs(processor, conversations, images, **kwargs)


_QWEN2_VL = VLMAdapter(family="qwen2_vl", model_types=("qwen2_5_vl", "qwen2_vl"),
                       model_class="Qwen2_5_VLForConditionalGeneration",
                       default_system_prompt="You are a helpful assistant.",
                       chat_template_name="qwen2_vl")
ADAPTERS: dict[str, VLMAdapter] = {
    "qwen2_5_vl": _QWEN2_VL,
    "qwen2_vl": VLMAdapter(**{**_QWEN2_VL.__dict__,
                              "model_class": "Qwen2VLForConditionalGeneration"}),
}
# Processor class name -> model_type, for adapter_for(processor).
_PROCESSOR_TYPES = {"Qwen2_5_VLProcessor": "qwen2_5_vl", "Qwen2VLProcessor": "qwen2_vl",
                    QwenVLImageOnlyProcessor.__name__: "qwen2_5_vl"}


def adapter_for(obj: Any) -> VLMAdapter:
    """The adapter of a model, config, processor, or a ``model_type`` string."""
    model_type = obj if isinstance(obj, str) else None
    config = getattr(obj, "config", obj)
    model_type = model_type or getattr(config, "model_type", None)
    if model_type is None:
        model_type = _PROCESSOR_TYPES.get(type(obj).__name__)
    if model_type not in ADAPTERS:
        raise ValueError(f"no VLM adapter for {type(obj).__name__} (model_type {model_type!r}); "
                         f"supported model types: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]

