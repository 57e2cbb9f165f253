"""The lens against eager ``output_attentions=True`` on the tiny Qwen2.5-VL (GQA, M-RoPE)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.lens import IMPLEMENTATION, AttentionLens, decoder_attention_modules
from tests.support.lens import EXACT, SAMPLES, assert_close, chat_batch, eager_masses, tiny_models


@pytest.mark.parametrize("padding_side, query_span", [
    ("left", "user"), ("right", "response"), ("left", "response"), ("right", "user")])
def test_masses_match_eager_attention(padding_side, query_span):
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor, padding_side)
    query = getattr(spans, query_span)
    assert bool((inputs["attention_mask"] == 0).any()), "the batch must contain padding"
    layers = [0, 2, 3]
    with torch.no_grad():
        lens = AttentionLens(model, layers=layers)
        with lens.capture(query, spans.image, spans.system) as cap:
            model(**inputs)
        for name, keys in (("image", spans.image), ("system", spans.system)):
            assert_close(cap.dense(name), eager_masses(eager, inputs, query, keys, layers), tol=EXACT)
        all_keys = inputs["attention_mask"].bool()
        assert_close(cap.dense("total"), eager_masses(eager, inputs, query, all_keys, layers), tol=EXACT)
    assert cap.image.shape == (3, 3, model.config.text_config.num_attention_heads, int(query.sum(1).max()))
    n_queries = query.sum(1).float().view(1, -1, 1).expand_as(cap.total[..., 0])
    assert torch.allclose(cap.total.sum(-1), n_queries, atol=1e-4)  # each query row sums to 1


def test_compact_layout_and_counts():
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    with torch.no_grad(), AttentionLens(model).capture(spans.user, spans.image, spans.system) as cap:
        model(**inputs)
    assert cap.layers == [0, 1, 2, 3]
    assert torch.equal(cap.key_counts("image"), spans.image.sum(1))
    for b in range(spans.user.shape[0]):
        positions = spans.user[b].nonzero().squeeze(1)
        n = len(positions)
        assert torch.equal(cap.query_index[b, :n], positions)
        assert cap.query_valid[b, :n].all() and not cap.query_valid[b, n:].any()
        assert (cap.image[:, b, :, n:] == 0).all()


def test_model_outputs_unchanged_and_implementation_restored():
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor, "right")
    with torch.no_grad():
        plain = model(**inputs).logits
        with AttentionLens(model, layers=[1]).capture(spans.user, spans.image, spans.system):
            assert model.config.text_config._attn_implementation == IMPLEMENTATION
            assert model.config.vision_config._attn_implementation == "sdpa"
            lensed = model(**inputs).logits
    assert_close(lensed, plain, tol=EXACT)  # zero-padded q/k and extra value columns change no score
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_avar_lens_capture") for m in decoder_attention_modules(model))
    lens = AttentionLens(model)
    with pytest.raises(RuntimeError, match="boom"), lens.capture(spans.user, spans.image, spans.system):
        raise RuntimeError("boom")
    assert model.config.text_config._attn_implementation == "sdpa"


def test_unpadded_single_sample_agrees_with_eager():
    """No padding -> SDPA gets no mask (its is_causal path)."""
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor, samples=SAMPLES[1:2])
    assert bool(inputs["attention_mask"].all())
    with torch.no_grad():
        with AttentionLens(model, layers=[-1]).capture(spans.response, spans.image, spans.system) as cap:
            model(**inputs)
        assert_close(cap.dense("image"), eager_masses(eager, inputs, spans.response, spans.image, [3]), tol=EXACT)


def _agto_like_loss(masses_image, masses_system):
    return -(masses_image + 1e-6).log().mean() + (masses_system + 1e-6).log().mean()


def _param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_match_eager():
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    q, layers = spans.user, [0, 3]
    valid = q[None, :, None, :].expand(len(layers), -1, model.config.text_config.num_attention_heads, -1)

    eager.zero_grad()
    out = eager(**inputs, output_attentions=True)
    attn = torch.stack([out.attentions[layer] for layer in layers])
    image = (attn * spans.image[None, :, None, None, :]).sum(-1)[valid]
    system = (attn * spans.system[None, :, None, None, :]).sum(-1)[valid]
    _agto_like_loss(image, system).backward()
    expected = _param_grads(eager)

    model.zero_grad()
    with AttentionLens(model, layers=layers).capture(q, spans.image, spans.system) as cap:
        model(**inputs)
    _agto_like_loss(cap.dense("image")[valid], cap.dense("system")[valid]).backward()
    got = _param_grads(model)
    eager.zero_grad()
    model.zero_grad()

    # SDPA hands v a gradient of zeros where the masses do not depend on it (the last layer's v_proj)
    assert {n for n, g in got.items() if g.abs().sum() > 0} <= set(expected)
    touched = [n for n in got if "language_model.layers.3.self_attn.q_proj" in n or "visual" in n]
    zero = [n for n in touched if not got[n].abs().sum() > 0]
    assert touched and not zero, zero
    for name in expected:
        assert_close(got[name], expected[name], tol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor)

    def grads():
        model.zero_grad()
        with AttentionLens(model, layers=[1, 2]).capture(spans.user, spans.image, spans.system) as cap:
            model(**inputs)
        _agto_like_loss(cap.image.sum(-1), cap.system.sum(-1)).backward()
        return _param_grads(model)

    plain = grads()
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    try:
        checkpointed = grads()
    finally:
        model.activation_checkpointing_disable()
        model.eval()
        model.zero_grad()
    for name in plain.keys() | checkpointed.keys():  # a missing gradient is one of zeros
        zero = torch.zeros_like(plain.get(name, checkpointed.get(name)))
        assert_close(checkpointed.get(name, zero), plain.get(name, zero), tol=1e-5)


def test_bfloat16_no_grad_is_close_to_float32():
    """bf16 models (GPU inference): the indicator columns go through the kernel's bf16 P @ V."""
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    with torch.no_grad():
        with AttentionLens(model).capture(spans.user, spans.image, spans.system) as ref:
            model(**inputs)
        model = copy.deepcopy(model).to(torch.bfloat16)  # the shared model keeps its float32 weights
        bf16_inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
        with AttentionLens(model).capture(spans.user, spans.image, spans.system) as cap:
            model(**bf16_inputs)
    assert cap.image.dtype == torch.float32
    assert_close(cap.image, ref.image, tol=0.05)


def test_misuse_is_reported_clearly():
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        AttentionLens(model, layers=[9])
    lens = AttentionLens(model)
    with pytest.raises(ValueError, match="image_mask has shape"), lens.capture(spans.user, spans.image[:, :-1]):
        pass
    with pytest.raises(ValueError, match="at least one key set"), lens.capture(spans.user):
        pass
    with pytest.raises(RuntimeError, match="ran twice"), torch.no_grad(), \
            lens.capture(spans.user, spans.image, spans.system):
        model(**inputs)
        model(**inputs)
    with lens.capture(spans.user, spans.image, spans.system) as cap:
        pass
    with pytest.raises(RuntimeError, match="no attention was observed"):
        cap.image  # noqa: B018
    with pytest.raises(ValueError, match="no decoder attention modules"):
        AttentionLens(torch.nn.Linear(2, 2))


def test_checkpointed_mass_backward_passes_gradcheck():
    """The backward of the checkpointed layers' masses against finite differences (float64, GQA,
    a padding key, causal mask)."""
    from types import SimpleNamespace

    from pipeline.lens.augmented import CheckpointedMass

    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 2, 1, 5, 4
    query = torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    value = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length).clone()
    mask[0, :, :, 0] = False  # a padding key
    mask[0, :, 0, 0] = True  # (the first row keeps one key)
    sets = (torch.rand(batch, length, 3, generator=gen) > 0.5).to(torch.float64)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    index = torch.tensor([[1, 2, 4], [0, 3, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])  # a padding slot
    assert torch.autograd.gradcheck(
        lambda q, k: CheckpointedMass.apply(q, k, value, sets, module, mask, 0.5, {}, index, valid), (query, key))


def test_text_only_qwen2_with_left_padding():
    """The lens is not VL-specific: a text-only Qwen2 decoder, a 'key set' of chosen tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    models = {}
    for impl in ("sdpa", "eager"):
        config._attn_implementation = impl
        models[impl] = Qwen2ForCausalLM(config).eval()
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    ids = torch.randint(1, 64, (2, 12))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    prefix = torch.zeros_like(ids, dtype=torch.bool)
    prefix[:, 3:6] = True
    query = torch.zeros_like(prefix)
    query[:, 8:] = True
    with torch.no_grad(), AttentionLens(models["sdpa"]).capture(query, key_masks={"prefix": prefix}) as cap:
        models["sdpa"](input_ids=ids, attention_mask=attention_mask)
    with torch.no_grad():
        reference = eager_masses(models["eager"], {"input_ids": ids, "attention_mask": attention_mask},
                                 query, prefix, [0, 1])
    assert cap.set_names == ["prefix", "total"]
    assert_close(cap.dense("prefix"), reference, tol=EXACT)


def test_the_key_set_columns_are_built_once_per_forward():
    """Building the indicator columns reads the masks onto the device: once per capture, shared
    by every layer; the masses stay those of eager attention."""
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor, "left")
    with torch.no_grad(), AttentionLens(model).capture(spans.response, spans.image, spans.system) as cap:
        model(**inputs)
    n_layers = model.config.text_config.num_hidden_layers
    assert sorted(cap._by_layer) == list(range(n_layers)) and len(cap._indicators) == 1
    assert_close(cap.dense("image"), eager_masses(eager, inputs, spans.response, spans.image, list(range(n_layers))),
                 tol=EXACT)


def test_padded_width_keeps_a_multiple_of_eight_columns():
    from pipeline.lens.augmented import padded_width

    assert padded_width(128, 5) == 136 and padded_width(64, 8) == 72 and padded_width(16, 3) == 24
