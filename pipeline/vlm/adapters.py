"""What differs between VLM families, behind one small interface, found by ``model_type``.

===============  ==================================  ==============  =========================
family           model types                         system turn     image tokens
===============  ==================================  ==============  =========================
``qwen2_vl``     ``qwen2_5_vl``, ``qwen2_vl``        template writes (14 px patch x 2 merge)^2
                                                     the paper's     = 784 px each, by area
``qwen3_vl``     ``qwen3_vl``, ``qwen3_vl_moe``      none            (16 x 2)^2 = 1024 px each
``gemma3``       ``gemma3``                          folded into     fixed per image
                                                     the first user  (``mm_tokens_per_image``)
                                                     turn
===============  ==================================  ==============  =========================

Everything the spans, the lens and the trainers need from a family is here: the model class,
the chat template with ``{% generation %}`` markers, the turn delimiters
(:class:`~pipeline.vlm.spans.ChatFormat`), which parameters are the vision encoder (frozen by
``freeze_vision_tower``) and which project vision features into the language model (kept
trainable). Whatever can be read off the processor itself (pixels per image token) is read
there, in :mod:`pipeline.vlm.inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from pipeline.vlm.inputs import build_inputs
from pipeline.vlm.processing import chat_template
from pipeline.vlm.spans import GEMMA_CHAT, QWEN_CHAT, ChatFormat, SpecialTokens


@dataclass(frozen=True)
class VLMAdapter:
    """What differs between VLM families (see the module table)."""

    family: str
    model_types: tuple[str, ...]
    model_class: str  # transformers class name
    chat_template_name: str  # prompts/chat_templates/<name>.jinja
    chat_format: ChatFormat
    template_system_prompt: str | None  # the system turn the stock template writes when none is given
    vision_parts: tuple[str, ...]  # dotted-name parts of vision-encoder parameters
    projector_parts: tuple[str, ...]  # ... of the projections into the language model (never frozen)

    def special_tokens(self, processor_or_tokenizer: Any) -> SpecialTokens:
        return SpecialTokens.from_tokenizer(processor_or_tokenizer, self.chat_format)

    def model_cls(self):
        import transformers
        return getattr(transformers, self.model_class)

    def chat_template(self) -> str:
        return chat_template(self.chat_template_name)

    def is_vision_encoder(self, parameter_name: str) -> bool:
        """Whether a parameter belongs to the vision encoder proper (not its projectors).

        Qwen3-VL's DeepStack mergers feed vision features into early decoder layers, so, like
        the final merger, they are projectors: freezing them would freeze part of the path by
        which the language model sees the image."""
        parts = parameter_name.split(".")
        return (any(p in parts for p in self.vision_parts)
                and not any(p in parts for p in self.projector_parts))

    def build_inputs(self, processor: ProcessorMixin, conversations: list[list[dict]],
                     images: list[list[Image.Image | bytes]] | None = None,
                     **kwargs: Any) -> BatchFeature:
        """Batched chat inputs for this family (see the module-level :func:`build_inputs`)."""
        return build_inputs(processor, conversations, images, **kwargs)


_QWEN2_VL = VLMAdapter(family="qwen2_vl", model_types=("qwen2_5_vl", "qwen2_vl"),
                       model_class="Qwen2_5_VLForConditionalGeneration", chat_template_name="qwen2_vl",
                       chat_format=QWEN_CHAT, template_system_prompt="You are a helpful assistant.",
                       vision_parts=("visual",), projector_parts=("merger",))
_QWEN3_VL = VLMAdapter(family="qwen3_vl", model_types=("qwen3_vl", "qwen3_vl_moe"),
                       model_class="Qwen3VLForConditionalGeneration", chat_template_name="qwen3_vl",
                       chat_format=QWEN_CHAT, template_system_prompt=None, vision_parts=("visual",),
                       projector_parts=("merger", "deepstack_merger_list"))
_GEMMA3 = VLMAdapter(family="gemma3", model_types=("gemma3",),
                     model_class="Gemma3ForConditionalGeneration", chat_template_name="gemma3",
                     chat_format=GEMMA_CHAT, template_system_prompt=None,
                     vision_parts=("vision_tower",), projector_parts=("multi_modal_projector",))
ADAPTERS: dict[str, VLMAdapter] = {
    "qwen2_5_vl": _QWEN2_VL,
    "qwen2_vl": replace(_QWEN2_VL, model_class="Qwen2VLForConditionalGeneration"),
    "qwen3_vl": _QWEN3_VL,
    "qwen3_vl_moe": replace(_QWEN3_VL, model_class="Qwen3VLMoeForConditionalGeneration"),
    "gemma3": _GEMMA3,
}
# Processor class name -> model_type, for adapter_for(processor) on stock processors; the
# project's own processors carry ``avar_model_type`` (set by load_processor).
_PROCESSOR_TYPES = {"Qwen2_5_VLProcessor": "qwen2_5_vl", "Qwen2VLProcessor": "qwen2_vl",
                    "Qwen3VLProcessor": "qwen3_vl", "Gemma3Processor": "gemma3"}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(obj: Any) -> VLMAdapter:
    """The adapter of a model, config, processor, or a ``model_type`` string."""
    model_type = obj if isinstance(obj, str) else None
    config = getattr(obj, "config", obj)
    model_type = model_type or getattr(obj, "avar_model_type", None) or getattr(config, "model_type", None)
    if model_type is None:
        model_type = _PROCESSOR_TYPES.get(type(obj).__name__)
    if model_type not in ADAPTERS:
        what = "" if isinstance(obj, str) else f"{type(obj).__name__} "
        raise ValueError(f"no VLM adapter for {what}model_type {model_type!r}; "
                         f"supported model types: {supported_model_types()}")
    return ADAPTERS[model_type]
