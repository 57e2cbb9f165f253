"""Key-column logit scaling: exact no-op at zero, exact against a scaled-key reference, the
expected direction, and generation with a KV cache."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.lens import AttentionLens
from pipeline.lens.intervention import (
    InterventionConfig,
    intervene,
    key_column_scaling,
    key_factors,
    rows_after_image,
)
from tests.support.lens import assert_close, chat_batch, tiny_models


def test_zero_intervention_is_a_bitwise_noop_for_forward_and_generate():
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    prompt, prompt_spans = chat_batch(processor, with_answer=False)
    generate = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        plain = model(**inputs).logits
        plain_gen = model.generate(**prompt, **generate)
        with key_column_scaling(model, spans.image, spans.system, a_img=0.0, a_sys=0.0):
            same = model(**inputs).logits
        with key_column_scaling(model, prompt_spans.image, prompt_spans.system, a_img=0.0, a_sys=0.0):
            same_gen = model.generate(**prompt, **generate)
    assert torch.equal(plain, same)
    assert torch.equal(plain_gen.sequences, same_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain_gen.scores, same_gen.scores, strict=True))


def test_first_layer_matches_eager_attention_on_scaled_keys():
    """Layer 0 sees the same input either way, so its attention rows after the image must equal
    eager attention computed with the scaled key vectors (RoPE is linear: scaling k_proj's
    output scales the rotated key)."""
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor, "left")
    a_img, a_sys = 0.3, 0.4
    factor = key_factors(spans.image, spans.system, a_img, a_sys)
    after = torch.arange(spans.image.shape[1])[None, :] >= rows_after_image(spans.image)[:, None]
    query = inputs["attention_mask"].bool()
    layer0 = eager.model.language_model.layers[0].self_attn.k_proj
    handle = layer0.register_forward_hook(lambda module, args, out: out * factor[:, :, None])
    try:
        with torch.no_grad():
            reference = eager(**inputs, output_attentions=True).attentions[0]
    finally:
        handle.remove()
    with torch.no_grad():
        with AttentionLens(model, layers=[0]).capture(query, spans.image, spans.system) as plain:
            model(**inputs)
        with key_column_scaling(model, spans.image, spans.system, a_img, a_sys, layers=[0]), \
                AttentionLens(model, layers=[0]).capture(query, spans.image, spans.system) as scaled:
            model(**inputs)
    rows = (after & query)[:, None, :].expand(-1, reference.shape[1], -1)
    for name, keys in (("image", spans.image), ("system", spans.system)):
        expected = (reference * keys[:, None, None, :]).sum(-1)
        assert_close(scaled.dense(name)[0][rows], expected[rows])
    before = (~after & query)[:, None, :].expand_as(rows)
    assert_close(scaled.dense("system")[0][before], plain.dense("system")[0][before], tol=1e-5)


def _positive_logit_model(model):
    """A copy whose layer 0 gives every query-key pair the same positive logit (2.0): q and k
    are a constant bias on the lowest-frequency RoPE pair, so rotation leaves q.k unchanged."""
    positive = copy.deepcopy(model)
    attn = positive.model.language_model.layers[0].self_attn
    heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    beta = (2.0 * dim**0.5) ** 0.5
    with torch.no_grad():
        for proj, n_heads in ((attn.q_proj, heads), (attn.k_proj, kv_heads)):
            proj.weight.zero_()
            bias = torch.zeros(n_heads, dim)
            bias[:, dim // 2 - 1] = beta
            proj.bias.copy_(bias.flatten())
    return positive


def test_scaling_moves_mass_to_image_and_away_from_system():
    model, _, processor = tiny_models()
    model = _positive_logit_model(model)
    inputs, spans = chat_batch(processor)
    query = spans.user & (torch.arange(spans.user.shape[1])[None, :] >= rows_after_image(spans.image)[:, None])
    with torch.no_grad():
        with AttentionLens(model, layers=[0]).capture(query, spans.image, spans.system) as before:
            model(**inputs)
        with key_column_scaling(model, spans.image, spans.system, a_img=0.15, a_sys=0.4, layers=[0]), \
                AttentionLens(model, layers=[0]).capture(query, spans.image, spans.system) as after:
            model(**inputs)
    valid = before.query_valid[None, :, None, :].expand_as(before.image)
    assert bool((after.image > before.image + 1e-4)[valid].all())
    assert bool((after.system < before.system - 1e-4)[valid].all())
    # uniform attention before: image mass = |I| / (allowed keys)
    first = before.query_index[0, 0]
    n_allowed = inputs["attention_mask"][0, : first + 1].sum()
    assert float(before.image[0, 0, 0, 0]) == pytest.approx(float(spans.image[0].sum() / n_allowed), rel=1e-3)


def test_generate_with_intervention_changes_scores_and_restores_model():
    model, _, processor = tiny_models()
    prompt, spans = chat_batch(processor, with_answer=False)
    generate = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        plain = model.generate(**prompt, **generate)
        with intervene(model, spans.image, spans.system, InterventionConfig(a_img=0.5, a_sys=0.6, layers=[1, -1])):
            scaled = model.generate(**prompt, **generate)
        again = model.generate(**prompt, **generate)
    assert scaled.sequences.shape == plain.sequences.shape
    assert not torch.equal(plain.scores[-1], scaled.scores[-1])
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, again.scores, strict=True))
    assert model.config.text_config._attn_implementation == "sdpa"


def test_bad_settings_are_refused():
    model, _, processor = tiny_models()
    _, spans = chat_batch(processor)
    with pytest.raises(ValueError, match="a_sys must be < 1"):
        InterventionConfig(a_sys=1.0)
    with pytest.raises(ValueError, match="a_img must be > -1"):
        InterventionConfig(a_img=-1.0)
    with pytest.raises(ValueError, match="overlap"), key_column_scaling(model, spans.image, spans.image | spans.system):
        pass
    with pytest.raises(ValueError, match="differ in shape"), key_column_scaling(model, spans.image, spans.system[:, 1:]):
        pass
    assert torch.equal(rows_after_image(torch.zeros(1, 4, dtype=torch.bool)), torch.tensor([torch.iinfo(torch.long).max]))
