"""What a finished synth run leaves in the Prefect UI: a markdown summary with readable tables
(funnel, per-stage results and reject reasons, teacher usage and cost, the VAS criterion and
its quantiles, links to the card and the dataset), and the same tables as table artifacts.

Every cell is a number or a short string: no dict is ever printed into a table (a histogram in
one cell once pushed the count column off screen).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.filtering.filter import STEPS
from pipeline.filtering.funnel import QUANTILES
from pipeline.plan import DEFAULT_PLAN, Plan
from pipeline.store import WorkStore
from pipeline.vas.separation import separation_rows

STEP_LABELS = {
    "input": "Candidates (scored by VAS)",
    "correct": "Answer verified against the gold answer",
    "format": "Response format `<think>`/`<answer>`",
    "anchors": "Enough visual anchors",
    "length": "Within the length bounds",
    "vas": "Passes the VAS criterion",
    "unique": "Not a duplicate: kept",
}
assert set(STEP_LABELS) == set(STEPS), "a filter step without a label"


def _wall_seconds(reports: list[dict]) -> float:
    """Wall-clock seconds a stage's shard tasks spanned (first start to last finish)."""
    if not reports:
        return 0.0
    return max(r["finished"] for r in reports) - min(r["started"] for r in reports)


def _reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "none"


def funnel_rows(funnel: dict) -> list[dict]:
    steps = funnel.get("steps") or {}
    first = steps.get("input") or 0
    return [{"Step": STEP_LABELS[step], "Samples": steps.get(step, 0),
             "Share of candidates": f"{100 * steps.get(step, 0) / first:.1f}%" if first else "n/a"}
            for step in STEPS if step in steps or not steps]


def stage_rows(summary: dict, store: WorkStore, plan: Plan = DEFAULT_PLAN) -> list[dict]:
    """Per stage: this run's work, the store's totals and its reject reasons."""
    this_run = {"seeds": [summary["seeds"]], **summary.get("stages", {})}
    rows = []
    for stage in plan.names:
        stage_store = store.stage(stage)
        counts = stage_store.counts()
        reports = this_run.get(stage, [])
        wall = _wall_seconds(reports)
        rows.append({"Stage": stage, "Results": counts["result"], "Rejects": counts["reject"],
                     "Reject reasons": _reasons(stage_store.reject_reasons()),
                     "New this run": sum(r.get("results", 0) + r.get("rejects", 0) for r in reports),
                     "Wall s": round(wall, 1)})
    return rows


def usage_rows(summary: dict) -> list[dict]:
    """Teacher requests, tokens and the estimated cost of this run, per teacher stage."""
    rows = []
    for stage, reports in summary.get("stages", {}).items():
        usages = [r["usage"] for r in reports if r.get("usage")]
        if not usages:
            continue
        total = {k: sum(u.get(k, 0) for u in usages) for k in usages[0]}
        rows.append({"Stage": stage, "Requests": total.get("requests", 0),
                     "Failed requests": total.get("failures", 0), "Cache hits": total.get("cache_hits", 0),
                     "Prompt tokens": total.get("prompt_tokens", 0),
                     "Completion tokens": total.get("completion_tokens", 0),
                     "Est. cost (USD)": f"{total.get('cost_usd', 0.0):.4f}"})
    return rows


def vas_lines(vas: dict) -> list[str]:
    """The VAS criterion and the candidates' VAS quantiles, as a short table."""
    if not vas:
        return ["No VAS criterion information (no candidate reached the filter)."]
    lines = [f"Criterion: {vas.get('criterion') or 'none'}; metric `{vas.get('metric')}`"
             + (f"; resolved threshold {vas['resolved_threshold']:.4g}"
                if vas.get("resolved_threshold") is not None else ""), ""]
    quantiles = vas.get("quantiles") or {}
    if quantiles:
        names = [name for name, _ in QUANTILES]
        lines += ["| VAS | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for metric, q in quantiles.items():
            lines.append(f"| {metric} | {q['n']} | " + " | ".join(f"{q[n]:.4g}" for n in names) + " |")
    return lines


def _reference_line(summary: dict) -> list[str]:
    if not summary.get("vas_model"):
        return []
    prompt = summary.get("vas_system_prompt")
    lines = [f"Reference model `{summary['vas_model']}`"
             + (f"; system prompt \"{prompt}\" written into every scored chat" if prompt else "") + ".", ""]
    evaluation = (summary.get("vas_reference") or {}).get("evaluation")
    if evaluation:
        lines += [(f"It learned to see: held-out accuracy {evaluation['accuracy_image']:.3f} with the image, "
                   f"{evaluation['accuracy_blank']:.3f} with a blank canvas (blind baseline "
                   f"{evaluation['blind_baseline']:.3f}, n = {evaluation['n']})."), ""]
    return lines


def control_lines(vas: dict) -> list[str]:
    """How well each VAS view separates real samples from the negative controls (AUC)."""
    table = vas.get("controls") or {}
    if not table:
        return []
    lines = ["### Negative controls: AUC of real samples against each kind", "",
             *_table(separation_rows(table, vas.get("metric"))), ""]
    best = table.get("best")
    if best:
        lines += [(f"Best separating view: `{best}` (mean AUC {table['mean_auc'][best]:.3f}); the filter "
                   f"reads `{vas.get('metric')}`."), ""]
    return lines


def _random_weights_note(summary: dict) -> list[str]:
    if not summary.get("vas_random_weights"):
        return []
    return [(f"> **The VAS reference model `{summary.get('vas_model')}` has random weights**: the scores "
             "exercise the code and carry no signal about visual grounding."), ""]


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(none)"]
    keys = list(rows[0])
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows)]


def _where(path: str | None) -> str:
    if not path:
        return "-"
    return f"[`{path}`]({Path(path).resolve().as_uri()})"


def run_summary_markdown(summary: dict, store: WorkStore, plan: Plan = DEFAULT_PLAN) -> str:
    published = summary.get("published", {})
    funnel = summary.get("funnel") or {}
    kept = (funnel.get("steps") or {}).get("unique", 0)
    lines = ["# AVAR synthesis run", ""]
    if not published.get("splits"):
        lines += [("> **No sample survived, nothing was published.** The tables below show where "
                   "the samples were rejected and why."), ""]
    lines += [f"- **Kept**: {kept} samples; splits: "
              + (", ".join(f"{k} {v}" for k, v in (published.get("splits") or {}).items()) or "-"),
              f"- **Data card**: {_where(published.get('card_path'))}",
              f"- **Published dataset**: {_where(published.get('out_dir'))}"
              + (f" (Hub: {published['pushed_url']})" if published.get("pushed_url") else ""),
              (f"- config `{summary['config_path']}` (digest `{summary['config_digest'][:16]}`), work store "
               f"`{summary['store_dir']}`, {summary['seconds']:.1f} s"), "",
              "## Funnel", "", *_table(funnel_rows(funnel)), "",
              "Filter rejects: " + _reasons(funnel.get("rejects") or {}), "",
              "## Stages", "", *_table(stage_rows(summary, store, plan)), "",
              "## Teacher usage and cost (this run)", "", *_table(usage_rows(summary)), "",
              "## VAS", "", *_reference_line(summary), *_random_weights_note(summary),
              *vas_lines(funnel.get("vas") or {}), "", *control_lines(funnel.get("vas") or {})]
    return "\n".join(lines) + "\n"


def publish_run_artifacts(summary: dict, store: WorkStore, plan: Plan = DEFAULT_PLAN) -> None:
    """The summary as a markdown artifact plus the funnel, stages and usage as table artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(key="avar-synth-run", markdown=run_summary_markdown(summary, store, plan),
                             description=f"AVAR synthesis run on {summary['config_path']}")
    create_table_artifact(funnel_rows(summary.get("funnel") or {}), key="avar-funnel",
                          description="Filter funnel: samples left after each check")
    create_table_artifact(stage_rows(summary, store, plan), key="avar-stages",
                          description="Per stage: results, rejects and reject reasons in the store")
    usage = usage_rows(summary)
    if usage:
        create_table_artifact(usage, key="avar-usage", description="Teacher requests, tokens and estimated cost")
