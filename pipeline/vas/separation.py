"""Does the VAS filter's score mean anything on this reference model? How well each view of
VAS separates the run's real samples from their negative controls (:mod:`pipeline.synthesis.controls`).

A *view* is one reduction of the lens's masses (``vas.views`` of a scored record), for one
query set: ``user.<view>`` (the question's tokens, the paper's VAS) or ``response.<view>``
(the synthesized answer's tokens, the filter's). Views (:data:`VIEWS`):

* ``raw``: the paper's VAS, the mean over layers, heads and queries of per-head ratios
  ``mass_I / (mass_S + eps)``;
* ``normalized``: ``raw / (|I| / |S|)`` (1 under uniform attention);
* ``ratio_of_means``: ``mean mass_I / (mean mass_S + eps)``;
* ``image_share``: the share of the queries' attention on the image (the budget's ``image``).

For every view and control kind the separation is the AUC of real samples against that kind's
controls (:func:`pipeline.stats.auc`: 1 = every real sample scores above every control, 0.5 =
no separation, below 0.5 = the view prefers the controls). User queries precede the response,
so under causal attention the text controls (``wrong_claims``, ``text_only``) leave the user
views unchanged: their AUC is exactly 0.5 by construction, and only ``blank_image`` can move them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

QUERY_SETS = ("user", "response")
VIEWS = {"raw": "paper VAS (mean of per-head ratios)", "normalized": "paper VAS, size-normalized",
         "ratio_of_means": "ratio of means", "image_share": "image share"}
METRICS = tuple(f"{q}.{v}" for q in QUERY_SETS for v in VIEWS)


def metric_label(metric: str) -> str:
    """``response.image_share`` -> "image share, response queries"."""
    queries, _, view = metric.partition(".")
    return f"{VIEWS.get(view, view)}, {queries} queries" if view else metric


def view_value(vas: dict, metric: str) -> float | None:
    """The value of ``metric`` (``<queries>.<view>``) in a VAS record or control (None if absent)."""
    queries, _, view = metric.partition(".")
    value = ((vas.get("views") or {}).get(queries) or {}).get(view)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class ControlSeparation:
    """Collects the views of real samples and of their controls, one record at a time."""

    real: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # kind -> metric -> values
    controls: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, record: dict) -> None:
        vas = record.get("vas")
        if not isinstance(vas, dict):
            return
        for kind, control in (vas.get("controls") or {}).items():
            for metric in METRICS:
                real, ungrounded = view_value(vas, metric), view_value(control, metric)
                if real is not None and ungrounded is not None:
                    self.real.setdefault(kind, {}).setdefault(metric, []).append(real)
                    self.controls.setdefault(kind, {}).setdefault(metric, []).append(ungrounded)

    @property
    def kinds(self) -> list[str]:
        """The control kinds seen, in :data:`~pipeline.synthesis.controls.CONTROL_KINDS` order."""
        from pipeline.synthesis.controls import CONTROL_KINDS
        return sorted(self.controls, key=lambda k: (CONTROL_KINDS.index(k) if k in CONTROL_KINDS else 99, k))

    def table(self) -> dict:
        """``{"kinds": [...], "n": {kind: pairs}, "auc": {metric: {kind: auc}}, "mean_auc": {metric: x},
        "best": metric}`` (empty when no sample had controls). ``best`` is the view with the highest
        mean AUC over the kinds: the one that separates best."""
        if not self.controls:
            return {}
        from pipeline.stats import auc  # SciPy: only when there is something to compare
        aucs: dict[str, dict[str, float]] = {}
        for metric in METRICS:
            row = {kind: auc(self.real[kind].get(metric, []), self.controls[kind].get(metric, []))
                   for kind in self.kinds}
            if any(math.isfinite(v) for v in row.values()):
                aucs[metric] = row
        means = {m: sum(v for v in row.values() if math.isfinite(v)) / sum(math.isfinite(v) for v in row.values())
                 for m, row in aucs.items()}
        best = max(means, key=lambda m: (means[m], -METRICS.index(m))) if means else None  # ties: METRICS order
        n = {kind: max((len(v) for v in self.controls[kind].values()), default=0) for kind in self.kinds}
        return {"kinds": self.kinds, "n": n, "auc": aucs, "mean_auc": means, "best": best}


def separation_rows(table: dict, chosen: str | None = None) -> list[dict]:
    """The AUC table as rows of short strings (run report, data card): one row per view, one
    column per control kind, the mean, and which view the filter reads (``chosen``) and which
    separates best."""
    rows = []
    best = table.get("best")
    for metric, row in (table.get("auc") or {}).items():
        tops = best is not None and table["mean_auc"][metric] >= table["mean_auc"][best] - 1e-12
        marks = [m for m, on in (("filter", metric == chosen), ("best", tops)) if on]
        rows.append({"View": metric_label(metric) + (f" ({', '.join(marks)})" if marks else ""),
                     **{kind: "n/a" if not math.isfinite(v) else f"{v:.3f}" for kind, v in row.items()},
                     "Mean": f"{table['mean_auc'][metric]:.3f}"})
    return rows
