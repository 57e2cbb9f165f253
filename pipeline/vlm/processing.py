"""Processors of Qwen-VL checkpoints, with a chat template that marks the trained tokens.

Qwen processors come from the stock ``AutoProcessor`` when torchvision is installed; without it
(the stock Qwen-VL processors insist on a torchvision video processor) an image-only
:class:`QwenVLImageOnlyProcessor` is used, built on transformers' PIL/numpy
``Qwen2VLImageProcessorPil``; it serves Qwen2-VL, Qwen2.5-VL and Qwen3-VL alike. Both give the
same token ids and image-token counts; pixel values agree up to the resize interpolation of PIL
versus torchvision. :func:`pipeline.vlm.loading.load_processor` also installs the family's copy
of the chat template (:func:`install_generation_template`), which adds the
``{% generation %}`` markers TRL's assistant-only loss needs, where it renders exactly like the
checkpoint's own.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from pipeline.resources import prompts_dir


@cache
def chat_template(name: str = "qwen2_vl") -> str:
    """A chat template from ``prompts/chat_templates/<name>.jinja``."""
    return (prompts_dir() / "chat_templates" / f"{name}.jinja").read_text().rstrip("\n")


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class QwenVLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen-VL processor for images only: image processor + tokenizer + chat template.

    The stock processor requires a video processor, and every transformers video processor
    needs torchvision. This subclass drops the video part and keeps the rest of the stock
    behaviour: each ``<|image_pad|>`` expands to ``grid_thw.prod() // merge_size**2`` pads, and
    it returns ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``.
    It round-trips ``save_pretrained``/``from_pretrained``.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template,
                                **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(f"{type(self).__name__} handles images only; install torchvision "
                             "for the stock processor with video support")
        return super().__call__(images=images, text=text, **kwargs)



def saved_processor_class(name_or_path: str | Path) -> str | None:
    path = Path(name_or_path) / "processor_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("processor_class")


def install_generation_template(processor: ProcessorMixin, ours: str | None = None) -> None:
    """Swap in ``ours`` (default: the Qwen2-VL template) when it renders the processor's own
    identically but adds the ``{% generation %}`` markers TRL's assistant-only loss needs;
    otherwise leave the processor's template alone."""
    ours = ours or chat_template()
    current = processor.chat_template
    if current == ours or not isinstance(current, str) or "{% generation %}" in current:
        return
    probes = _template_probes()
    for probe in probes:
        for gen in (False, True):
            a = processor.apply_chat_template(probe, chat_template=current, tokenize=False,
                                              add_generation_prompt=gen)
            b = processor.apply_chat_template(probe, chat_template=ours, tokenize=False,
                                              add_generation_prompt=gen)
            if a != b:
                return
    processor.chat_template = ours
    processor.tokenizer.chat_template = ours


def _template_probes() -> list[list[dict]]:
    img, text = {"type": "image"}, {"type": "text", "text": "What is x?"}
    return [
        [{"role": "user", "content": [img, text]}, {"role": "assistant", "content": "x = 2"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
         {"role": "user", "content": [text, img, img]}],
    ]

