"""Scoring: the reference model under the attention lens, batched by length."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline.lens import AttentionLens
from pipeline.lens.budget import (
    BUDGET_NAMES,
    attention_budget,
    budget_key_masks,
    per_layer_vas,
    ratio_of_means,
)
from pipeline.lens.objectives import size_normalized_vas, vas_ratio
from pipeline.paper import DEFAULT_SYSTEM_PROMPT
from pipeline.vas import DEFAULT_EPS, ScoreError, VASConfig, VASItem
from pipeline.vas.separation import VIEWS
from pipeline.vlm import adapter_for, build_inputs, compute_spans, load_model_and_processor
from pipeline.vlm.inputs import check_max_pixels, image_token_pixels, with_system_prompt
from pipeline.vlm.loading import for_inference, has_random_weights


def load_scoring_model(config: VASConfig):
    """(model, processor) for ``config.model`` on ``config.device`` in eval mode."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, processor = load_model_and_processor(config.model, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return for_inference(model).to(device).eval(), processor



def _conversation(item: VASItem, queries: str, system_prompt: str, folded: bool) -> list[dict]:
    content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": item.question}]
    turns = [{"role": "user", "content": content}]
    if queries == "response":
        turns.append({"role": "assistant", "content": item.response})
    return with_system_prompt(turns, system_prompt, folded=folded)


def _length_estimate(item: VASItem, max_pixels: int | None, token_pixels: int | None) -> int:
    """Sort key: characters plus image tokens (one per ``token_pixels`` pixels; a fixed 256 per
    image for processors that do not size by area)."""
    text = len(item.question) + len(item.response or "")
    if token_pixels is None:
        return text // 3 + 256 * len(item.images)
    pixels = sum(min(im.width * im.height, max_pixels or im.width * im.height) for im in item.images)
    return text // 3 + pixels // token_pixels


def score_items(model, processor, items: Sequence[VASItem], config: VASConfig,
                model_name: str | None = None, intervention=None) -> list[dict | ScoreError]:
    """VAS record (``schemas/sample.schema.json#vas``) or :class:`ScoreError` per item, in order.

    ``intervention`` (an :class:`~pipeline.lens.intervention.InterventionConfig`) measures the
    attention under the training-free intervention instead of the model's own."""
    lens = AttentionLens(model, layers=config.layers)
    device = next(model.parameters()).device
    folded = adapter_for(processor).chat_format.folded_system
    if config.max_pixels is not None:
        check_max_pixels(processor, config.max_pixels)
    token_pixels = image_token_pixels(processor)
    results: list[dict | ScoreError | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: -_length_estimate(items[i], config.max_pixels, token_pixels))
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    # a processor with fixed tokens per image applies no pixel budget: record none
    max_pixels = config.max_pixels if token_pixels is not None else None
    base = {"model": model_name or config.model, "queries": config.queries, "max_pixels": max_pixels,
            "layers": list(lens.layers), "random_weights": has_random_weights(config.model),
            "system_prompt": config.system_prompt}
    bar = tqdm(total=len(items), desc=f"VAS ({config.queries})", unit="sample", disable=not config.progress)
    query_sets = ("user", "response") if config.queries == "response" else ("user",)
    for batch in batches:
        conversations = [_conversation(items[i], config.queries, config.system_prompt, folded) for i in batch]
        inputs = build_inputs(processor, conversations, [items[i].images for i in batch],
                              padding_side="right", max_pixels=config.max_pixels)
        spans = compute_spans(inputs["input_ids"], inputs["attention_mask"], processor)
        sets = {name: mask.to(device) for name, mask in budget_key_masks(spans).items()}
        scaled = contextlib.nullcontext()
        if intervention is not None:
            from pipeline.lens.intervention import intervene
            scaled = intervene(model, sets["image"], sets["system"], intervention)
        # one forward, every query set: the response's capture holds the question's rows too
        captured = spans.user | spans.response if config.queries == "response" else spans.user
        with torch.no_grad(), scaled, lens.capture(captured.to(device), key_masks=sets) as cap:
            model(**inputs.to(device), logits_to_keep=1)
        n_image, n_system = spans.image.sum(1), spans.system.sum(1)
        views = {q: _views(cap.restricted(getattr(spans, q).to(device)), config.eps, n_image, n_system)
                 for q in query_sets}
        main, n_query = views[config.queries], getattr(spans, config.queries).sum(1)
        for row, i in enumerate(batch):
            results[i] = _result(base, float(main["raw"][row]), float(main["normalized"][row]), int(n_image[row]),
                                 int(n_system[row]), int(n_query[row]))
            if isinstance(results[i], dict):
                shares = main["budget"].row(row)
                results[i].update(budget={k: shares[k] for k in BUDGET_NAMES},
                                  budget_per_layer=shares["per_layer"],
                                  ratio_of_means=float(main["ratio_of_means"][row]),
                                  per_layer=[float(v) for v in main["per_layer"][row]],
                                  views={q: {name: float(v[name][row]) for name in VIEWS} for q, v in views.items()})
        bar.update(len(batch))
    bar.close()
    return results


def _views(cap, eps: float, n_image: torch.Tensor, n_system: torch.Tensor) -> dict:
    """Every view of :data:`pipeline.vas.separation.VIEWS` (``[B]`` each), the budget and the
    per-layer VAS of one query set's capture."""
    raw = vas_ratio(cap, eps).cpu()
    budget = attention_budget(cap)
    return {"raw": raw, "normalized": size_normalized_vas(raw, n_image, n_system),
            "ratio_of_means": ratio_of_means(cap, eps).cpu(),
            "image_share": budget.overall[:, BUDGET_NAMES.index("image")].cpu(),
            "budget": budget, "per_layer": per_layer_vas(cap, eps).cpu()}


def _result(base: dict, raw: float, normalized: float, n_image: int, n_system: int, n_query: int):
    if n_system == 0:
        return ScoreError("vas_no_system_tokens", "the chat has no system span, so the ratio is undefined")
    if n_image == 0:
        return ScoreError("vas_no_image_tokens", "no image token in the model input")
    if n_query == 0:
        return ScoreError("vas_no_query_tokens", f"the {base['queries']} span is empty")
    return {**base, "raw": raw, "normalized": normalized, "n_image_tokens": n_image, "n_system_tokens": n_system}



@dataclass
class ModelVAS:
    """Model-level VAS over a probe set: means of the per-sample scores that are defined."""

    raw: float
    normalized: float
    n_scored: int
    n_skipped: int
    per_sample: list[dict | ScoreError]

    def companions(self) -> dict:
        """Means over the scored samples of the ratio of means and of the budget shares."""
        good = [s for s in self.per_sample if not isinstance(s, ScoreError)]
        if not good:
            return {}
        return {"ratio_of_means": sum(s["ratio_of_means"] for s in good) / len(good),
                "budget": {k: sum(s["budget"][k] for s in good) / len(good) for k in BUDGET_NAMES},
                "per_layer": [sum(v) / len(good) for v in zip(*(s["per_layer"] for s in good), strict=True)]}


def model_vas(model, processor, items: Iterable[VASItem], layers: Sequence[int] | None = None,
              batch_size: int = 4, max_pixels: int | None = 262144, eps: float = DEFAULT_EPS,
              model_name: str = "model", progress: bool = True, intervention=None,
              system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> ModelVAS:
    """The paper's VAS of ``model``: queries ``U``, prefill only, mean over layers, heads, tokens
    and the probe set (samples that cannot be scored are counted in ``n_skipped``)."""
    config = VASConfig(model=model_name, queries="user", layers=list(layers) if layers is not None else None,
                       batch_size=batch_size, max_pixels=max_pixels, eps=eps, progress=progress,
                       system_prompt=system_prompt)
    scores = score_items(model, processor, list(items), config, model_name=model_name, intervention=intervention)
    good = [s for s in scores if not isinstance(s, ScoreError)]
    mean = (lambda key: sum(s[key] for s in good) / len(good)) if good else (lambda key: float("nan"))
    return ModelVAS(raw=mean("raw"), normalized=mean("normalized"), n_scored=len(good),
                    n_skipped=len(scores) - len(good), per_sample=scores)

