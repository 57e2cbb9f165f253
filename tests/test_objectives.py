"""SPEC formulas over lens captures, checked against the formulas written out on eager attention."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.lens import AttentionLens
from pipeline.lens.objectives import (
    agto_applies,
    agto_terms,
    size_normalized_vas,
    vas_ratio,
    visual_reward,
)
from tests.support.lens import SAMPLES, chat_batch, tiny_models

EPS = 1e-6
MIXED = [SAMPLES[0], ([], "What is 3 + 4?", "<think>3 + 4 = 7</think><answer>7</answer>"), SAMPLES[1]]


def _eager_attention(eager, inputs):
    with torch.no_grad():
        return torch.stack(eager(**inputs, output_attentions=True).attentions)  # [l, B, H, L, L]


def _capture(model, inputs, query, spans, layers=None, grad=False):
    lens = AttentionLens(model, layers=layers)
    with torch.set_grad_enabled(grad), lens.capture(query, spans.image, spans.system) as cap:
        model(**inputs)
    return cap


def _sums(attn, keys):
    return (attn * keys[None, :, None, None, :]).sum(-1)  # [l, B, H, L]


def test_vas_ratio_is_the_spec_mean_of_per_head_ratios():
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    cap = _capture(model, inputs, spans.user, spans)
    attn = _eager_attention(eager, inputs)
    ratio = _sums(attn, spans.image) / (_sums(attn, spans.system) + EPS)
    for b in range(3):
        expected = ratio[:, b][:, :, spans.user[b]].mean()
        assert float(vas_ratio(cap, EPS)[b]) == pytest.approx(float(expected), rel=1e-4)


def test_uniform_attention_gives_the_token_ratio_and_normalized_one():
    """Zero q/k projections make every layer attend uniformly: raw VAS = |I|/|S|, normalized 1."""
    model, _, processor = tiny_models()
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        for layer in uniform.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    inputs, spans = chat_batch(processor)
    cap = _capture(uniform, inputs, spans.user, spans)
    raw = vas_ratio(cap, eps=0.0)
    n_image, n_system = spans.image.sum(1), spans.system.sum(1)
    assert torch.allclose(raw, n_image / n_system, rtol=1e-4)
    assert torch.allclose(size_normalized_vas(raw, n_image, n_system), torch.ones(3, dtype=torch.float64), rtol=1e-4)
    assert torch.isnan(size_normalized_vas(2.0, 0, 5)) and torch.isnan(size_normalized_vas(2.0, 5, 0))


def test_agto_terms_match_formula_skip_imageless_samples_and_backpropagate():
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor, samples=MIXED)
    layers = [1, 3]
    cap = _capture(model, inputs, spans.user, spans, layers=layers, grad=True)
    l_enh, l_sup = agto_terms(cap, spans.user, spans.image, spans.system, eps=EPS)
    attn = _eager_attention(eager, inputs)[layers]
    assert agto_applies(cap).tolist() == [True, False, True]
    for b in (0, 2):
        q = spans.user[b]
        mean_image = _sums(attn, spans.image)[:, b][:, :, q].sum(-1) / (q.sum() * spans.image[b].sum())
        mean_system = _sums(attn, spans.system)[:, b][:, :, q].sum(-1) / (q.sum() * spans.system[b].sum())
        assert float(l_enh[b].detach()) == pytest.approx(float(-torch.log(mean_image + EPS).mean()), rel=1e-4)
        assert float(l_sup[b].detach()) == pytest.approx(float(torch.log(mean_system + EPS).mean()), rel=1e-4)
    assert float(l_enh[1].detach()) == 0.0 and float(l_sup[1].detach()) == 0.0
    mean_enh, mean_sup = agto_terms(cap, eps=EPS, reduction="mean")
    assert float(mean_enh.detach()) == pytest.approx(float((l_enh[0] + l_enh[2]).detach() / 2))
    model.zero_grad()
    (0.15 * mean_enh + 0.15 * mean_sup).backward()
    q_proj = model.model.language_model.layers[3].self_attn.q_proj.weight
    assert q_proj.grad is not None and float(q_proj.grad.abs().sum()) > 0
    model.zero_grad()


def test_visual_reward_sums_heads_and_applies_the_correctness_gate():
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor, samples=MIXED)
    cap = _capture(model, inputs, spans.response, spans)
    attn = _eager_attention(eager, inputs)
    ratio = _sums(attn, spans.image).sum(2) / (_sums(attn, spans.system).sum(2) + EPS)  # [l, B, L]
    reward = visual_reward(cap, spans.response, spans.image, spans.system, eps=EPS)
    for b in range(3):
        expected = ratio[:, b][:, spans.response[b]].mean()
        assert float(reward[b]) == pytest.approx(float(expected), rel=1e-4, abs=1e-9)
    assert float(reward[1]) == 0.0  # no image: nothing to reward
    gated = visual_reward(cap, eps=EPS, correct=torch.tensor([False, True, True]))
    assert float(gated[0]) == 0.0 and float(gated[2]) == float(reward[2])


def test_empty_query_sets_and_mismatched_masks():
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    no_response = spans.response.clone()
    no_response[1] = False
    cap = _capture(model, inputs, no_response, spans)
    assert float(visual_reward(cap)[1]) == 0.0
    assert torch.isnan(vas_ratio(cap)[1]) and not torch.isnan(vas_ratio(cap)[0])
    assert float(agto_terms(cap)[0][1]) == 0.0
    with pytest.raises(ValueError, match="query_mask differs"):
        agto_terms(cap, query_mask=spans.response)
    with pytest.raises(ValueError, match="reduction"):
        agto_terms(cap, reduction="sum")
    with pytest.raises(ValueError, match="correct has shape"):
        visual_reward(cap, correct=torch.tensor([True]))
    with AttentionLens(model).capture(spans.user, image_mask=spans.image) as image_only, torch.no_grad():
        model(**inputs)
    with pytest.raises(ValueError, match="no 'system' key set"):
        vas_ratio(image_only)


def test_sup_floor_stops_l_sup_below_it():
    """Guard (off by default): below the floor L_sup is constant, so it no longer pushes."""
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    cap = _capture(model, inputs, spans.user, spans, grad=True)
    _, paper = agto_terms(cap, reduction="mean")
    _, floored = agto_terms(cap, reduction="mean", sup_floor=0.99)  # above every head's mean
    assert floored.item() == pytest.approx(torch.log(torch.tensor(0.99 + EPS)).item(), rel=1e-6)
    assert paper.item() < floored.item()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(floored, params, allow_unused=True, retain_graph=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)
    grads = torch.autograd.grad(paper, params, allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 0 for g in grads)


def test_bounded_visual_reward_is_the_image_share():
    """Guard (off by default): r_visual as the response's image share, in [0, 1]."""
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    cap = _capture(model, inputs, spans.response, spans)
    share = visual_reward(cap, form="image_share")
    attn = _eager_attention(eager, inputs).sum(2)  # heads summed [l, B, L, L]
    per_token = ((attn * spans.image[None, :, None, :]).sum(-1) / attn.sum(-1)).mean(0)  # [B, L]
    expected = (per_token * spans.response).sum(-1) / spans.response.sum(-1)
    assert torch.allclose(share, expected, rtol=1e-4) and bool(((share >= 0) & (share <= 1)).all())
    assert bool((visual_reward(cap) > share).all())  # the paper's ratio is not bounded by 1
    with pytest.raises(ValueError, match="form"):
        visual_reward(cap, form="log")
