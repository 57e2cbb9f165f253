"""SPEC formulas as thin reductions over a lens :class:`~pipeline.lens.Capture`.

Each formula of SPEC.md lives in exactly one function here:

* :func:`vas_ratio` -- Visual Attention Score of each sample (per-head ratio, mean over layers,
  heads and query tokens);
* :func:`size_normalized_vas` -- raw VAS divided by its uniform-attention value ``|I| / |S|``;
* :func:`agto_terms` -- the AGTO SFT terms ``L_enh`` and ``L_sup``;
* :func:`visual_reward` -- the VARS visual reward ``r_visual`` (heads summed, correctness-gated).

All take the capture of one forward pass whose key sets include ``"image"`` and ``"system"``;
the query set is whatever the capture was given (user tokens ``U`` for VAS/AGTO, response
tokens ``R`` for response VAS and VARS). Every function works on the compact masses
``[n_layers, B, H, Qmax]`` and is differentiable where training needs it.
"""

from __future__ import annotations

import torch

from pipeline.lens.capture import Capture
from pipeline.paper import EPS

DEFAULT_EPS = EPS


def _check_masks(cap: Capture, query_mask, image_mask, system_mask) -> None:
    """The masks a caller passes must be the ones the capture used (catches mix-ups early)."""
    for name, given, used in (("query_mask", query_mask, cap.query_mask),
                              ("image_mask", image_mask, cap.key_masks.get("image")),
                              ("system_mask", system_mask, cap.key_masks.get("system"))):
        if given is None:
            continue
        if used is None:
            raise ValueError(f"{name} given but the capture has no such key set")
        if given.shape != used.shape or not torch.equal(given.to(used.device).bool(), used):
            raise ValueError(f"{name} differs from the mask the capture was taken with")
    for name in ("image", "system"):
        if name not in cap.key_masks:
            raise ValueError(f"the capture has no {name!r} key set; pass {name}_mask to lens.capture")


def _masked_query_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis (query slots) where ``valid`` [B, Qmax]; NaN for no queries."""
    count = valid.sum(-1).to(values.dtype)
    total = torch.where(valid, values, torch.zeros_like(values)).sum(-1)  # padding slots may be 0/0
    return total / count  # 0/0 -> NaN: a sample without queries has no defined score


def vas_ratio(cap: Capture, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Per-sample VAS ``[B]``: mean over layers, heads and queries of
    ``sum_{k in I} A / (sum_{k in S} A + eps)`` (SPEC "Visual Attention Score").

    NaN for a sample without query tokens. A sample without system tokens gives ``mass_I/eps``
    (huge): callers (:mod:`pipeline.vas`) refuse such samples before reporting.
    """
    _check_masks(cap, None, None, None)
    ratio = cap.image / (cap.system + eps)  # [n_layers, B, H, Qmax]
    per_query = ratio.mean(dim=(0, 2))  # [B, Qmax]
    return _masked_query_mean(per_query, cap.query_valid.to(per_query.device))


def size_normalized_vas(raw: torch.Tensor | float, n_image: torch.Tensor | int,
                        n_system: torch.Tensor | int) -> torch.Tensor:
    """``raw / (|I| / |S|)`` (**ours**): 1.0 under uniform attention, whatever the resolution.

    NaN where ``|I|`` or ``|S|`` is 0 (undefined).
    """
    raw = torch.as_tensor(raw, dtype=torch.float64)
    n_image = torch.as_tensor(n_image, dtype=torch.float64)
    n_system = torch.as_tensor(n_system, dtype=torch.float64)
    defined = (n_image > 0) & (n_system > 0)
    safe = torch.where(defined, n_image / n_system.clamp(min=1), torch.ones_like(n_image))
    return torch.where(defined, raw / safe, torch.full_like(raw * safe, float("nan")))


def agto_terms(cap: Capture, query_mask: torch.Tensor | None = None,
               image_mask: torch.Tensor | None = None, system_mask: torch.Tensor | None = None,
               eps: float = DEFAULT_EPS, reduction: str = "none",
               sup_floor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AGTO terms (SPEC "AGTO") over the captured queries ``Q`` and layers:

    ``L_enh = - mean_l mean_h log( mean_{q in Q, k in I} A + eps )``
    ``L_sup = + mean_l mean_h log( mean_{q in Q, k in S} A + eps )``

    The masks are optional and only checked against the capture's. With ``reduction="none"``
    returns ``[B]`` tensors where samples without image tokens (or without queries or system
    tokens) are 0 -- AGTO is skipped for them; ``"mean"`` averages over the samples it applies to
    (0, still attached to the graph, when none). ``L = L_LM + alpha * L_enh + beta * L_sup``.

    ``sup_floor`` (**ours**, off by default = the paper): the mean system attention inside
    ``L_sup`` is clamped from below at this value, so ``L_sup`` stops pushing once a head's
    system attention is under the floor (the paper's term has no floor until ``log(eps)``, and
    drives the system mass of some heads to ~0, which blows the mean-of-ratios VAS up).
    """
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    _check_masks(cap, query_mask, image_mask, system_mask)
    valid = cap.query_valid.to(cap.image.device)
    n_query = valid.sum(-1).to(torch.float32)  # [B]
    n_image = cap.key_counts("image").to(valid.device, torch.float32)
    n_system = cap.key_counts("system").to(valid.device, torch.float32)
    applies = (n_query > 0) & (n_image > 0) & (n_system > 0)

    def term(mass: torch.Tensor, n_keys: torch.Tensor, floor: float | None = None) -> torch.Tensor:
        summed = (mass * valid[None, :, None, :]).sum(-1)  # [n_layers, B, H]
        mean_attention = summed / (n_query * n_keys).clamp(min=1)[None, :, None]
        if floor is not None:  # no gradient below the floor: the term stops pushing there
            mean_attention = mean_attention.clamp(min=floor)
        return torch.log(mean_attention + eps).mean(dim=(0, 2))  # [B]

    l_enh = torch.where(applies, -term(cap.image, n_image), torch.zeros_like(n_query))
    l_sup = torch.where(applies, term(cap.system, n_system, sup_floor), torch.zeros_like(n_query))
    if reduction == "mean":
        count = applies.sum().clamp(min=1)
        return l_enh.sum() / count, l_sup.sum() / count
    return l_enh, l_sup


def agto_applies(cap: Capture) -> torch.Tensor:
    """Bool ``[B]``: samples :func:`agto_terms` scores (has queries, image and system tokens)."""
    has_query = cap.query_valid.any(-1)
    return has_query & (cap.key_counts("image") > 0) & (cap.key_counts("system") > 0)


def visual_reward(cap: Capture, response_mask: torch.Tensor | None = None,
                  image_mask: torch.Tensor | None = None, system_mask: torch.Tensor | None = None,
                  eps: float = DEFAULT_EPS, correct: torch.Tensor | None = None,
                  form: str = "ratio") -> torch.Tensor:
    """VARS ``r_visual`` ``[B]`` (SPEC "VARS"): mean over response tokens ``t`` (the captured
    queries) and layers of ``sum_{k in I} A[l,t,k] / (sum_{k in S} A[l,t,k] + eps)`` with
    ``A`` summed over heads; 0 where ``correct`` (bool ``[B]``) is False, and 0 for an empty
    response. A reward needs no gradient: call it (and the forward) under ``torch.no_grad()``.

    ``form="image_share"`` (**ours**, a bounded guard; the paper's is ``"ratio"``): the share of
    the response tokens' attention on the image, ``sum_I A / sum_all A`` with heads summed, in
    [0, 1], so ``r_visual`` cannot swamp ``r_acc`` (after AGTO the paper's ratio reached ~5e5 on
    a tiny model).
    """
    if form not in ("ratio", "image_share"):
        raise ValueError(f"form must be 'ratio' or 'image_share', got {form!r}")
    _check_masks(cap, response_mask, image_mask, system_mask)
    image = cap.image.sum(dim=2)  # heads summed: [n_layers, B, Qmax]
    if form == "image_share":
        per_token = (image / cap.total.sum(dim=2).clamp(min=1e-30)).mean(dim=0)  # [B, Qmax]
    else:
        per_token = (image / (cap.system.sum(dim=2) + eps)).mean(dim=0)
    reward = torch.nan_to_num(_masked_query_mean(per_token, cap.query_valid.to(per_token.device)), nan=0.0)
    if correct is not None:
        correct = torch.as_tensor(correct, device=reward.device).bool()
        if correct.shape != reward.shape:
            raise ValueError(f"correct has shape {tuple(correct.shape)}, expected {tuple(reward.shape)}")
        reward = torch.where(correct, reward, torch.zeros_like(reward))
    return reward
