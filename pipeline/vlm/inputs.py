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
    if max_pixels is not None and image_token_pixels(processor) is not None:
        check_max_pixels(processor, max_pixels)
        current = processor.image_processor.size
        shortest = (current.get("shortest_edge") if isinstance(current, dict)
                    else getattr(current, "shortest_edge", None)) or 0
        size = {"shortest_edge": min(shortest, max_pixels), "longest_edge": max_pixels}
        kwargs["images_kwargs"] = {"size": size}
    # the template already wrote BOS where the family has one (Gemma); the tokenizer must not again
    if flat and image_token_pixels(processor) is None:  # Gemma 3 counts images per sample
        flat = [[_as_rgb(img, i) for img in sample_images] for i, sample_images in enumerate(images)]
    return processor(text=texts, images=flat or None, padding=True, padding_side=padding_side,
                     return_tensors="pt", add_special_tokens=False, **kwargs)


def image_token_pixels(processor: ProcessorMixin) -> int | None:
    """Pixels one image token covers, for processors that size images by area (Qwen-VL:
    ``(patch_size * merge_size) ** 2``, 784 for Qwen2.5-VL, 1024 for Qwen3-VL); None where each
    image becomes a fixed number of tokens whatever its size (Gemma 3), so a pixel budget does
    not apply."""
    image_processor = getattr(processor, "image_processor", None)
    patch, merge = (getattr(image_processor, name, None) for name in ("patch_size", "merge_size"))
    if isinstance(patch, int) and isinstance(merge, int):
        return (patch * merge) ** 2
    return None


def check_max_pixels(processor: ProcessorMixin, max_pixels: int) -> None:
    """Refuse a budget below one image token of this processor."""
    per_token = image_token_pixels(processor)
    if per_token is not None and max_pixels < per_token:
        side = round(per_token ** 0.5)
        raise ValueError(f"max_pixels={max_pixels} is below one image token ({side}x{side} = "
                         f"{per_token} pixels for this processor)")


def with_system_prompt(conversation: list[dict], system_prompt: str, folded: bool = False) -> list[dict]:
    """``conversation`` with an explicit system turn: unchanged when it has one, else with
    ``system_prompt`` prepended (SPEC: VAS divides by the system span, so every sample must have
    one; families whose template writes none by default get it here, the same in the VAS stage,
    the trainers and eval). ``folded`` families (Gemma 3) mark the end of the prompt with a blank
    line, so a prompt holding one is refused."""
    if not isinstance(system_prompt, str) or not system_prompt.strip():
        raise ValueError(f"system_prompt must be a non-empty string, got {system_prompt!r}")
    has_system = bool(conversation) and conversation[0].get("role") == "system"
    if folded:
        text = conversation[0]["content"] if has_system else system_prompt
        text = text if isinstance(text, str) else " ".join(p.get("text", "") for p in text)
        if "\n\n" in text:
            raise ValueError("the system prompt holds a blank line; this family's template folds the "
                             "prompt into the first user turn and ends it at the first blank line")
    if has_system:
        return conversation
    return [{"role": "system", "content": system_prompt}, *conversation]


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
