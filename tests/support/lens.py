"""Shared lens fixtures: a tiny model (any family) in sdpa and eager form, a padded chat batch,
and the eager reference masses (used by the lens, objectives, intervention, VAS and family tests
and bench/gpu.py)."""

from __future__ import annotations

from functools import cache

import torch
from PIL import Image

from pipeline.paper import DEFAULT_SYSTEM_PROMPT
from pipeline.vlm import adapter_for, build_inputs, load_model_and_processor, resolve_model_name
from pipeline.vlm.inputs import with_system_prompt
from pipeline.vlm.spans import compute_spans

REL_TOL = 1e-4
EXACT = 1e-6  # float32: the lens against eager output_attentions, relative to the largest value


@cache
def tiny_models(alias: str = "tiny"):
    """(sdpa model, eager model with the same weights, processor), float32, eval mode."""
    path = resolve_model_name(alias)
    model, processor = load_model_and_processor(path, dtype=torch.float32, attn_implementation="sdpa")
    eager, _ = load_model_and_processor(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), eager.eval(), processor


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


SAMPLES = [  # (images, question, answer): one image, two images, a longer answer
    ([(64, 48)], "What is x?", "<think>x is 2</think><answer>2</answer>"),
    ([(100, 80), (30, 30)], "Solve for x: 3x + 5 = 20", "<think>3x = 15 so x = 5</think><answer>5</answer>"),
    ([(56, 112)], "The angle at B is marked 40 degrees. Find the angle at A.",
     "<think>Look back at the triangle: 180 - 90 - 40 = 50.</think><answer>50</answer>"),
]


def chat_batch(processor, padding_side: str = "left", samples=SAMPLES, with_answer: bool = True):
    """(inputs, spans) for ``samples`` as one padded batch, each with the explicit system turn."""
    folded = adapter_for(processor).chat_format.folded_system
    conversations, images = [], []
    for i, (sizes, question, answer) in enumerate(samples):
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": question}]
        turns = [{"role": "user", "content": content}]
        if with_answer:
            turns.append({"role": "assistant", "content": answer})
        conversations.append(with_system_prompt(turns, DEFAULT_SYSTEM_PROMPT, folded))
        images.append([_image(10 * i + j, size) for j, size in enumerate(sizes)])
    inputs = build_inputs(processor, conversations, images, padding_side=padding_side,
                          add_generation_prompt=not with_answer)
    return inputs, compute_spans(inputs["input_ids"], inputs["attention_mask"], processor)


def eager_masses(eager, inputs, query_mask, key_mask, layers):
    """Reference per-position masses ``[n_layers, B, H, L]`` from materialised attention."""
    out = eager(**inputs, output_attentions=True)
    attn = torch.stack([out.attentions[layer] for layer in layers])
    return (attn * key_mask[None, :, None, None, :]).sum(-1) * query_mask[None, :, None, :]


def assert_close(got, ref, tol=REL_TOL):
    scale = ref.abs().max().clamp(min=1e-12)
    assert float((got - ref).abs().max() / scale) <= tol, float((got - ref).abs().max() / scale)
