"""The lens against eager ``output_attentions=True`` on the tiny Qwen2.5-VL (GQA, M-RoPE)."""

from __future__ import annotations

import pytest
import torch

from pipeline.lens import IMPLEMENTATION, AttentionLens, decoder_attention_modules
from tests.support.lens import SAMPLES, assert_close, chat_batch, eager_masses, tiny_models


@pytest.mark.parametrize("padding_side, query_span, kernel_lse", [
    ("left", "user", True), ("right", "response", True), ("left", "response", False), ("right", "user", False)])
def test_masses_match_eager_attention(padding_side, query_span, kernel_lse):
    """Both paths: row log-sum-exp from the SDPA kernel, and whole rows scored by the lens."""
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor, padding_side)
    query = getattr(spans, query_span)
    assert bool((inputs["attention_mask"] == 0).any()), "the batch must contain padding"
    layers = [0, 2, 3]
    with torch.no_grad():
        lens = AttentionLens(model, layers=layers, kernel_lse=kernel_lse)
        with lens.capture(query, spans.image, spans.system) as cap:
            model(**inputs)
        for name, keys in (("image", spans.image), ("system", spans.system)):
            assert_close(cap.dense(name), eager_masses(eager, inputs, query, keys, layers))
        all_keys = inputs["attention_mask"].bool()
        assert_close(cap.dense("total"), eager_masses(eager, inputs, query, all_keys, layers))
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
    assert torch.equal(plain, lensed)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_avar_lens_capture") for m in decoder_attention_modules(model))
    lens = AttentionLens(model)
    with pytest.raises(RuntimeError, match="boom"), lens.capture(spans.user, spans.image, spans.system):
        raise RuntimeError("boom")
    assert model.config.text_config._attn_implementation == "sdpa"


def test_unpadded_single_sample_and_tiny_chunks_agree_with_eager():
    """No padding -> SDPA gets no mask (is_causal path); chunks of one query give the same."""
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor, samples=SAMPLES[1:2])
    assert bool(inputs["attention_mask"].all())
    with torch.no_grad():
        lens = AttentionLens(model, layers=[-1], chunk_bytes=1, kernel_lse=False)
        with lens.capture(spans.response, spans.image, spans.system) as cap:
            model(**inputs)
        assert_close(cap.dense("image"), eager_masses(eager, inputs, spans.response, spans.image, [3]))


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

    assert set(got) == set(expected)
    touched = [n for n in got if "language_model.layers.3.self_attn.q_proj" in n or "visual" in n]
    zero = [n for n in touched if not got[n].abs().sum() > 0]
    assert touched and not zero, zero
    for name in expected:
        assert_close(got[name], expected[name], tol=1e-3)


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
    for name in plain:
        assert_close(checkpointed[name], plain[name], tol=1e-5)


@pytest.mark.parametrize("kernel_lse", [True, False])
def test_bfloat16_no_grad_is_close_to_float32(kernel_lse):
    """bf16 models (GPU inference) through both paths; the generic one is what CUDA runs."""
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    with torch.no_grad():
        with AttentionLens(model).capture(spans.user, spans.image, spans.system) as ref:
            model(**inputs)
        model.to(torch.bfloat16)
        try:
            bf16_inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
            with AttentionLens(model, kernel_lse=kernel_lse).capture(spans.user, spans.image, spans.system) as cap:
                model(**bf16_inputs)
        finally:
            model.to(torch.float32)
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


def test_key_set_mass_backward_passes_gradcheck():
    """The hand-written backward against finite differences (float64, GQA, logit scaling,
    chunking, a padding query slot and a masked key)."""
    from pipeline.lens.mass import KeySetMass as _KeySetMass
    from pipeline.lens.mass import Rows as _Rows

    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 2, 1, 5, 2
    query = torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length).clone()
    mask[0, :, :, 0] = False  # a padding key
    key_sets = (torch.rand(batch, length, 2, generator=gen) > 0.5).to(torch.float64)
    index, valid = torch.tensor([[2, 3, 4], [3, 4, 0]]), torch.tensor([[True, True, True], [True, True, False]])
    for scaled in (False, True):
        spec = _Rows(mask, index, valid, upper_left_causal=False)
        if scaled:
            spec.scaled = torch.tensor([[False, True, True], [True, True, True]])
            spec.key_factor = 1 + 0.3 * torch.rand(batch, length, generator=gen, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda q, k, spec=spec: _KeySetMass.apply(q, k, key_sets, spec, 0.5, 2), (query, key))


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
    for kernel_lse in (True, False):
        with torch.no_grad(), AttentionLens(models["sdpa"], kernel_lse=kernel_lse).capture(
                query, key_masks={"prefix": prefix}) as cap:
            models["sdpa"](input_ids=ids, attention_mask=attention_mask)
        with torch.no_grad():
            reference = eager_masses(models["eager"], {"input_ids": ids, "attention_mask": attention_mask},
                                     query, prefix, [0, 1])
        assert cap.set_names == ["prefix", "total"]
        assert_close(cap.dense("prefix"), reference)


def test_cuda_kernel_bias_is_the_mask_broadcast_over_heads_with_aligned_rows():
    """The additive mask handed to the CUDA memory-efficient kernel (built on any device)."""
    from pipeline.lens.kernels import _aligned_bias

    mask = torch.zeros(2, 1, 5, 21).masked_fill_(torch.rand(2, 1, 5, 21) > 0.5, float("-inf"))
    query = torch.zeros(2, 4, 5, 8)
    bias = _aligned_bias(mask, query)
    assert bias.shape == (2, 4, 5, 21) and bias.dtype == query.dtype
    assert torch.equal(bias, mask.expand(2, 4, 5, 21))
    assert bias.stride(-2) % 16 == 0 and bias.stride(1) == 0  # rows padded to 16 keys, heads shared
    assert _aligned_bias(None, query) is None


@pytest.mark.parametrize("kernel_lse", [True, False])
def test_what_the_layers_share_is_built_once_per_forward(kernel_lse, monkeypatch):
    """Building the key layout reads counts back from the device (a GPU stall): once per capture,
    not once per layer; the masses stay those of eager attention."""
    from pipeline.lens import capture as capture_module
    from pipeline.lens.mass import KeyLayout

    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor, "left")
    compactions = []
    real_of = KeyLayout.of
    monkeypatch.setattr(capture_module.KeyLayout, "of",
                        classmethod(lambda cls, sets: compactions.append(sets.shape) or real_of(sets)))
    with torch.no_grad(), AttentionLens(model, kernel_lse=kernel_lse).capture(spans.response, spans.image,
                                                                              spans.system) as cap:
        model(**inputs)
    n_layers = model.config.text_config.num_hidden_layers
    assert sorted(cap._by_layer) == list(range(n_layers)) and len(cap._layouts) == 1
    assert len(compactions) == (1 if kernel_lse else 0)  # keys are compacted only where scored alone
    assert_close(cap.dense("image"), eager_masses(eager, inputs, spans.response, spans.image, list(range(n_layers))))


def test_float32_scores_are_the_float32_product_of_the_same_numbers():
    from pipeline.lens.mass import float32_scores

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 16, generator=gen).bfloat16()
    k = torch.randn(2, 3, 11, 16, generator=gen).bfloat16()
    expected = q.double() @ k.double().transpose(-1, -2)
    got = float32_scores(q, k)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 7, 11)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6)
    if torch.cuda.is_available():  # the tensor-core path (bmm with float32 output)
        got_cuda = float32_scores(q.cuda(), k.cuda())
        assert got_cuda.dtype == torch.float32
        assert torch.allclose(got_cuda.double().cpu(), expected, rtol=1e-6, atol=1e-6)
