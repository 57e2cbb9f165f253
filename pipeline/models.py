"""Vision-language models: loading, per-family adapters, batched chat inputs, a tiny test model.

- :func:`load_model_and_processor` loads Qwen2.5-VL / Qwen2-VL checkpoints (hub id or folder).
  Processors come from the stock ``AutoProcessor`` when torchvision is installed; without it
  (the stock Qwen-VL processor insists on a torchvision video processor) an image-only
  :class:`QwenVLImageOnlyProcessor` is used, built on transformers' PIL/numpy
  ``Qwen2VLImageProcessorPil``. Both give the same token ids and image-token counts; pixel
  values agree up to the resize interpolation of PIL versus torchvision.
- :class:`VLMAdapter` holds what is family-specific (special tokens, default system prompt,
  chat template); :func:`adapter_for` finds it in a registry keyed by ``model_type``.
- :func:`build_inputs` turns HF-format conversations and their images into a padded batch.
- :func:`tiny_model_path` / :func:`build_tiny_model` (in :mod:`pipeline.tiny_vlm`) give a
  random-weight Qwen2.5-VL with a real chat template for tests and benchmarks.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, BatchFeature
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from pipeline.images import open_image
from pipeline.spans import SpecialTokens

CHAT_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "prompts" / "chat_templates"


@cache
def chat_template(name: str = "qwen2_vl") -> str:
    """A chat template from ``prompts/chat_templates/<name>.jinja``."""
    return (CHAT_TEMPLATE_DIR / f"{name}.jinja").read_text().rstrip("\n")


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class QwenVLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only: image processor + tokenizer + chat template.

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


def load_processor(name_or_path: str | Path, **kwargs: Any) -> ProcessorMixin:
    """The processor of a checkpoint, with a chat template that has generation markers.

    Folders saved with :class:`QwenVLImageOnlyProcessor` (the tiny model) and any checkpoint
    on a machine without torchvision load with that class; otherwise the stock AutoProcessor.
    """
    saved_class = _saved_processor_class(name_or_path)
    if saved_class == QwenVLImageOnlyProcessor.__name__ or not torchvision_available():
        processor = QwenVLImageOnlyProcessor.from_pretrained(str(name_or_path), **kwargs)
    else:
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(str(name_or_path), **kwargs)
    _install_generation_template(processor)
    return processor


def load_model_and_processor(name_or_path: str | Path, dtype: str | torch.dtype = "auto",
                             attn_implementation: str = "sdpa", device_map: Any = None,
                             **model_kwargs: Any) -> tuple[torch.nn.Module, ProcessorMixin]:
    """Model and processor of a Qwen2.5-VL / Qwen2-VL checkpoint (hub id or local folder).

    ``attn_implementation="eager"`` is needed wherever attention probabilities are read.
    """
    config = AutoConfig.from_pretrained(str(name_or_path))
    adapter = adapter_for(config)
    model = adapter.model_cls().from_pretrained(
        str(name_or_path), dtype=dtype, attn_implementation=attn_implementation,
        device_map=device_map, **model_kwargs)
    return model, load_processor(name_or_path)


def _saved_processor_class(name_or_path: str | Path) -> str | None:
    path = Path(name_or_path) / "processor_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("processor_class")


def _install_generation_template(processor: ProcessorMixin) -> None:
    """Swap in our template when it renders the processor's own identically (but adds the
    ``{% generation %}`` markers TRL's assistant-only loss needs); otherwise leave it."""
    ours = chat_template()
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


def build_inputs(processor: ProcessorMixin, conversations: list[list[dict]],
                 images: list[list[Image.Image | bytes]] | None = None,
                 add_generation_prompt: bool = False, padding_side: str = "right",
                 max_pixels: int | None = None) -> BatchFeature:
    """Batched chat inputs: ``input_ids``, ``attention_mask`` and, when any sample has images,
    ``pixel_values`` and ``image_grid_thw`` (images of all samples concatenated in order).

    Messages use the HF format, e.g. ``{"role": "user", "content": [{"type": "image"},
    {"type": "text", "text": "..."}]}``; ``images[i]`` are the images of conversation ``i`` in
    the order of its image parts, as PIL images or encoded bytes (decoded with
    :func:`pipeline.images.open_image`). ``max_pixels`` caps each image's resized area (keep it
    fixed within a dataset: raw VAS depends on the number of image tokens).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if not conversations:
        raise ValueError("build_inputs needs at least one conversation")
    images = images if images is not None else [[] for _ in conversations]
    if len(images) != len(conversations):
        raise ValueError(f"got {len(conversations)} conversations but {len(images)} image lists")
    tokenizer = processor.tokenizer
    special_strings = set(tokenizer.all_special_tokens) | {
        token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    for i, (conversation, sample_images) in enumerate(zip(conversations, images)):
        n_parts = _check_conversation(conversation, i, special_strings)
        if n_parts != len(sample_images):
            raise ValueError(f"conversation {i}: {n_parts} image parts but "
                             f"{len(sample_images)} images given")
    texts = [processor.apply_chat_template(c, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
             for c in conversations]
    flat = [_as_rgb(img, i) for i, sample_images in enumerate(images) for img in sample_images]
    kwargs: dict[str, Any] = {}
    if max_pixels is not None:
        current = processor.image_processor.size
        shortest = (current.get("shortest_edge") if isinstance(current, dict)
                    else getattr(current, "shortest_edge", None)) or 0
        size = {"shortest_edge": min(shortest, max_pixels), "longest_edge": max_pixels}
        kwargs["images_kwargs"] = {"size": size}
    return processor(text=texts, images=flat or None, padding=True, padding_side=padding_side,
                     return_tensors="pt", **kwargs)


def _as_rgb(image: Image.Image | bytes, index: int) -> Image.Image:
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = open_image(bytes(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"conversation {index}: images must be PIL images or encoded bytes, "
                         f"got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_conversation(conversation: list[dict], index: int, special: set[str]) -> int:
    """Validate one conversation; return its number of image parts.

    Text containing a special token string (e.g. a teacher answer with "<|im_end|>") would be
    tokenized as that control token and silently corrupt the turn structure, so it is refused.
    """
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"conversation {index}: expected a non-empty list of messages")
    n_images = 0
    for m, message in enumerate(conversation):
        where = f"conversation {index}, message {m}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: expected a dict with 'role' and 'content'")
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise TypeError(f"{where}: content must be a string or a list of parts, "
                             f"got {type(content).__name__}")
        for p, part in enumerate(parts):
            if not isinstance(part, dict):
                raise TypeError(f"{where}, part {p}: expected a dict, got {type(part).__name__}")
            if part.get("type") == "image" or "image" in part or "image_url" in part:
                n_images += 1
            elif part.get("type") == "video" or "video" in part:
                raise ValueError(f"{where}, part {p}: video parts are not supported")
            text = part.get("text", "")
            if not isinstance(text, str):
                raise TypeError(f"{where}, part {p}: text must be a string, "
                                 f"got {type(text).__name__}")
            bad = sorted(s for s in special if s and s in text)
            if bad:
                raise ValueError(f"{where}, part {p}: text contains special token(s) {bad}")
    return n_images


def tiny_model_path(cache_dir: str | Path | None = None) -> Path:
    from pipeline.tiny_vlm import tiny_model_path as _tiny_model_path
    return _tiny_model_path(cache_dir)


def build_tiny_model(out_dir: str | Path, seed: int = 0, **config_overrides: Any) -> Path:
    from pipeline.tiny_vlm import build_tiny_model as _build_tiny_model
    return _build_tiny_model(out_dir, seed=seed, **config_overrides)
