"""The markdown summary a synth run leaves as a Prefect artifact (funnel, rejects, timings, card)."""

from __future__ import annotations

from pipeline.plan import DEFAULT_PLAN, Plan
from pipeline.store import WorkStore


def _stage_timing(reports: list[dict]) -> tuple[float, float, int, int]:
    """(wall seconds, summed task seconds, results, rejects) over a stage's shard reports."""
    if not reports:
        return 0.0, 0.0, 0, 0
    wall = max(r["finished"] for r in reports) - min(r["started"] for r in reports)
    busy = sum(r["finished"] - r["started"] for r in reports)
    return wall, busy, sum(r.get("results", 0) for r in reports), sum(r.get("rejects", 0) for r in reports)


def _funnel_rows(funnel: dict) -> list[tuple[str, str]]:
    rows = []
    for key, value in funnel.items():
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", str(v)) for k, v in value.items()]
        else:
            rows.append((key, str(value)))
    return rows


def run_summary_markdown(summary: dict, store: WorkStore, plan: Plan = DEFAULT_PLAN) -> str:
    published = summary.get("published", {})
    lines = ["# AVAR synthesis run", "",
             f"- config: `{summary['config_path']}` (digest `{summary['config_digest'][:16]}`)",
             f"- work store: `{summary['store_dir']}`",
             f"- published dataset: `{published.get('out_dir', '?')}`",
             f"- data card: `{published.get('card_path', '?')}`",
             f"- total time: {summary['seconds']:.1f} s", "",
             "## Stages (this run)", "",
             "| stage | new results | new rejects | skipped (done before) | wall s | task s |",
             "|---|---:|---:|---:|---:|---:|"]
    seeds = summary["seeds"]
    lines.append(f"| seeds | {seeds['results']} | {seeds['rejects']} | {seeds['skipped']} | "
                 f"{seeds['finished'] - seeds['started']:.1f} | {seeds['finished'] - seeds['started']:.1f} |")
    for stage, reports in summary["stages"].items():
        wall, busy, results, rejects = _stage_timing(reports)
        skipped = sum(r.get("skipped", 0) for r in reports)
        lines.append(f"| {stage} | {results} | {rejects} | {skipped} | {wall:.1f} | {busy:.1f} |")
    lines += ["", "## Store totals and reject reasons", "",
              "| stage | results | rejects | reasons |", "|---|---:|---:|---|"]
    for stage in plan.names:
        stage_store = store.stage(stage)
        counts = stage_store.counts()
        reasons = ", ".join(f"{k}: {v}" for k, v in stage_store.reject_reasons().items()) or "-"
        lines.append(f"| {stage} | {counts['result']} | {counts['reject']} | {reasons} |")
    lines += ["", "## Funnel", "", "| step | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in _funnel_rows(summary.get("funnel") or {})]
    return "\n".join(lines) + "\n"
