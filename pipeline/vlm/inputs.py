"""Batched chat inputs from HF-format conversations and their images."""

from __future__ import annotations

from typing import Any

from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from pipeline.images import open_image


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
