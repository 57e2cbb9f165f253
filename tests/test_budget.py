"""The attention budget and the robust companions of VAS (pipeline/lens/budget.py), against
attention materialised by the eager implementation of the tiny model."""

from __future__ import annotations

import pytest
import torch

from pipeline.lens import AttentionLens
from pipeline.lens.budget import (
    BUDGET_NAMES,
    BUDGET_SETS,
    attention_budget,
    budget_key_masks,
    per_layer_vas,
    ratio_of_means,
)
from pipeline.lens.objectives import vas_ratio
from pipeline.paper import EPS
from tests.support.lens import chat_batch, tiny_models


def _eager_shares(eager, inputs, query, sets, layers):
    """[B, n_layers, 5] shares from output_attentions: mean over heads and queries per layer."""
    with torch.no_grad():
        attn = torch.stack([eager(**inputs, output_attentions=True).attentions[layer] for layer in layers])
    masses = [(attn * m[None, :, None, None, :].float()).sum(-1) for m in sets.values()]  # [L, B, H, Lq]
    shares = [*masses, 1.0 - sum(masses)]
    q = query.float()[None, :, None, :]
    return torch.stack([((s * q).sum(dim=(2, 3)) / (q.sum(dim=(2, 3)) * s.shape[2])).T for s in shares], dim=-1)


@pytest.mark.parametrize("queries", ["user", "response"])
def test_budget_matches_eager_attention_and_sums_to_one(queries):
    model, eager, processor = tiny_models()
    inputs, spans = chat_batch(processor, padding_side="left")
    query = spans.user if queries == "user" else spans.response
    sets = budget_key_masks(spans)
    lens = AttentionLens(model)
    with torch.no_grad(), lens.capture(query, key_masks=sets) as cap:
        model(**inputs)
    budget = attention_budget(cap)
    reference = _eager_shares(eager, inputs, query, sets, lens.layers)
    assert torch.allclose(budget.per_layer.double(), reference.double(), atol=1e-5)
    assert torch.allclose(budget.overall.sum(-1), torch.ones(3), atol=1e-5)  # the shares of a row sum to 1
    assert bool((budget.per_layer > -1e-6).all())
    if queries == "user":  # causal: user queries cannot see the response that follows them
        assert float(budget.overall[:, BUDGET_NAMES.index("response")].abs().max()) < 1e-7
    row = budget.row(0)
    assert set(row) == {*BUDGET_NAMES, "per_layer"} and len(row["per_layer"]["image"]) == len(lens.layers)


def test_one_capture_of_user_and_response_queries_gives_both_views_exactly():
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor, padding_side="right")
    sets = budget_key_masks(spans)
    lens = AttentionLens(model)
    separate = {}
    for name in ("user", "response"):
        with torch.no_grad(), lens.capture(getattr(spans, name), key_masks=sets) as cap:
            model(**inputs)
        separate[name] = cap
    with torch.no_grad(), lens.capture(spans.user | spans.response, key_masks=sets) as both:
        model(**inputs)
    for name, alone in separate.items():
        view = both.restricted(getattr(spans, name))
        assert torch.allclose(vas_ratio(view), vas_ratio(alone), rtol=1e-5)
        assert torch.allclose(attention_budget(view).per_layer, attention_budget(alone).per_layer, atol=1e-6)
        assert torch.allclose(ratio_of_means(view), ratio_of_means(alone), rtol=1e-5)
        assert torch.equal(view.dense("image") != 0, alone.dense("image") != 0)
    with pytest.raises(ValueError, match="not captured"):
        separate["user"].restricted(spans.response)


def test_companions_of_vas():
    model, _, processor = tiny_models()
    inputs, spans = chat_batch(processor)
    with torch.no_grad(), AttentionLens(model).capture(spans.user, key_masks=budget_key_masks(spans)) as cap:
        model(**inputs)
    per_layer = per_layer_vas(cap)
    assert torch.allclose(per_layer.mean(dim=1), vas_ratio(cap), rtol=1e-5)  # the paper's VAS is their mean
    valid = cap.query_valid[None, :, None, :]
    image = (cap.image * valid).sum(dim=(0, 2, 3)) / (valid.sum(dim=(0, 2, 3)) * cap.image.shape[0] * cap.image.shape[2])
    system = (cap.system * valid).sum(dim=(0, 2, 3)) / (valid.sum(dim=(0, 2, 3)) * cap.image.shape[0] * cap.image.shape[2])
    assert torch.allclose(ratio_of_means(cap), image / (system + EPS), rtol=1e-5)


def test_a_head_without_system_mass_rules_vas_but_not_the_ratio_of_means():
    """The failure mode of the paper's mean of ratios, on a synthetic capture: one head of eight
    puts no mass on the system prompt."""
    from pipeline.lens.capture import Capture
    heads, q = 8, 4
    cap = Capture(layers=[0, 1], query_mask=torch.ones(1, q, dtype=torch.bool),
                  key_masks={"image": torch.ones(1, q, dtype=torch.bool), "system": torch.ones(1, q, dtype=torch.bool)},
                  query_index=torch.arange(q)[None], query_valid=torch.ones(1, q, dtype=torch.bool))
    image, system = torch.full((1, heads, q), 0.3), torch.full((1, heads, q), 0.1)
    system[:, 0] = 0.0
    for layer in (0, 1):
        cap._by_layer[layer] = torch.stack([image, system, torch.ones_like(image)], dim=-1)
    assert float(vas_ratio(cap)) > 1e4  # 0.3 / eps in one head swamps the mean
    assert float(ratio_of_means(cap)) == pytest.approx(0.3 / (0.1 * 7 / 8), rel=1e-4)


def test_overlapping_sets_are_refused():
    _, _, processor = tiny_models()
    _, spans = chat_batch(processor)
    spans.user = spans.user | spans.image
    with pytest.raises(ValueError, match="overlap"):
        budget_key_masks(spans)
    assert BUDGET_SETS == ("system", "image", "user", "response")
