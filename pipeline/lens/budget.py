"""The attention budget beside VAS (**ours**): where the chosen queries' attention goes.

The paper's VAS is a mean of per-head ratios ``mass_I / (mass_S + eps)``; a few heads whose
system mass falls to ~0 can rule that mean (observed: VAS 2.7 -> 7e5 after 30 AGTO steps on a
tiny model while the image share went 0.24 -> 0.94). The budget says what happened in plain
shares: for each query row, the fraction of its attention on each key set, which sum to 1:

* ``system``, ``image``, ``user`` (user text, without image pads), ``response`` (response tokens
  up to the query itself, for response queries; 0 for user queries under causal attention),
* ``rest``: everything else (template tokens, role markers, the first token / attention sink).

Shares are exact (the lens's masses; ``rest = 1 - the others``), averaged over heads and valid
queries per layer, then over layers. Beside it, two robust companions of VAS:
:func:`ratio_of_means` (``mean mass_I / mean mass_S`` over layers, heads and queries) and
:func:`per_layer_vas` (the paper's ratio, per layer), which show a blow-up as what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.lens.capture import Capture
from pipeline.paper import EPS

BUDGET_SETS = ("system", "image", "user", "response")
BUDGET_NAMES = (*BUDGET_SETS, "rest")


def budget_key_masks(spans) -> dict[str, torch.Tensor]:
    """The lens key sets of the budget from :class:`~pipeline.vlm.spans.Spans` (disjoint)."""
    masks = {name: getattr(spans, name).bool() for name in BUDGET_SETS}
    overlap = sum(m.long() for m in masks.values()) > 1
    if bool(overlap.any()):
        raise ValueError("budget key sets overlap: spans must be disjoint (system, image, user, response)")
    return masks


@dataclass
class AttentionBudget:
    """Shares per sample: ``per_layer`` ``[B, n_layers, 5]`` and ``overall`` ``[B, 5]`` in the
    order of :data:`BUDGET_NAMES` (NaN for a sample without queries)."""

    layers: list[int]
    per_layer: torch.Tensor
    overall: torch.Tensor

    def row(self, i: int) -> dict:
        """Sample ``i`` as plain numbers: ``{"system": .., ..., "rest": .., "per_layer": {...}}``."""
        out = {name: float(self.overall[i, k]) for k, name in enumerate(BUDGET_NAMES)}
        out["per_layer"] = {name: [float(v) for v in self.per_layer[i, :, k]] for k, name in enumerate(BUDGET_NAMES)}
        return out


def _query_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[n_layers, B, H, Q]`` -> ``[B, n_layers]``: mean over heads and valid queries."""
    valid = valid.to(values.device)
    summed = torch.where(valid[None, :, None, :], values, torch.zeros_like(values)).sum(dim=(2, 3))
    count = (valid.sum(-1) * values.shape[2]).to(values.dtype)  # queries x heads
    return (summed / count).transpose(0, 1)


def attention_budget(cap: Capture) -> AttentionBudget:
    """The budget of a capture taken with :func:`budget_key_masks` as its key sets."""
    missing = [name for name in BUDGET_SETS if name not in cap.key_masks]
    if missing:
        raise ValueError(f"the capture lacks budget key sets {missing}: capture with budget_key_masks(spans)")
    total = cap.total.clamp(min=1e-30)
    shares = [cap.mass(name) / total for name in BUDGET_SETS]
    shares.append(1.0 - sum(shares))
    per_layer = torch.stack([_query_mean(s, cap.query_valid) for s in shares], dim=-1)  # [B, L, 5]
    return AttentionBudget(layers=list(cap.layers), per_layer=per_layer, overall=per_layer.mean(dim=1))


def ratio_of_means(cap: Capture, eps: float = EPS) -> torch.Tensor:
    """``[B]``: ``mean mass_I / (mean mass_S + eps)``, means over layers, heads and valid queries.
    Bounded where the paper's mean of ratios is not: one head with no system mass cannot rule it."""
    image = _query_mean(cap.image, cap.query_valid).mean(dim=1)
    system = _query_mean(cap.system, cap.query_valid).mean(dim=1)
    return image / (system + eps)


def per_layer_vas(cap: Capture, eps: float = EPS) -> torch.Tensor:
    """``[B, n_layers]``: the paper's ratio averaged over heads and queries, per layer (the
    paper's VAS is the mean of these)."""
    return _query_mean(cap.image / (cap.system + eps), cap.query_valid)
