"""The data card's VAS pieces: the histogram of the filter's metric, how the card names that
metric, and what it says of a learned reference model's other questions."""

from __future__ import annotations

import io

from pipeline.vas.separation import metric_label


def _histogram_panels(raw: list[float], normalized: list[float], views: dict[str, list[float]],
                      metric: str | None) -> list[tuple[str, list[float], str, str]]:
    """(name, published values, title, x label) per panel: the raw VAS, and the filter's metric
    (the normalized VAS when the filter reads raw or nothing)."""
    second = metric if metric in views or metric == "normalized" else "normalized"
    panels = [("raw", raw, "response VAS (raw)", "VAS")]
    if second == "normalized":
        return [*panels, ("normalized", normalized, "response VAS (normalized)", "VAS / (|I| / |S|)")]
    return [*panels, (second, views.get(second, []), f"filter metric: {second}", metric_label(second))]


def vas_histogram(raw: list[float], normalized: list[float], views: dict[str, list[float]], vas_info: dict) -> bytes:
    """PNG of the raw response VAS and of the filter's metric: filter candidates (grey) and
    published (blue)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metric, threshold = vas_info.get("metric"), vas_info.get("resolved_threshold")
    fig = Figure(figsize=(8, 3.2), dpi=100)
    for ax, (name, values, title, xlabel) in zip(fig.subplots(1, 2), _histogram_panels(raw, normalized, views, metric), strict=True):
        candidates = (vas_info.get("histograms") or {}).get(name)
        bins = candidates["edges"] if candidates else min(30, max(5, len(values) // 3))
        if candidates:
            ax.stairs(candidates["counts"], candidates["edges"], fill=True, color="#d0d0d0",
                      label="filter candidates")
        if values:
            ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white", label="published")
        if not values and not candidates:
            ax.text(0.5, 0.5, "no VAS values", ha="center", va="center", transform=ax.transAxes)
        if threshold is not None and name == metric:
            ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"filter cut {threshold:.4g}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("samples")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def other_tasks(reference: dict | None) -> list[tuple[str, float, int]]:
    """(task, accuracy with the image, n) of the reference model's questions outside its graded set."""
    evaluation = (reference or {}).get("evaluation") or {}
    graded = set(evaluation.get("graded_tasks") or ())
    return [(task, value[0], value[1]) for task, value in sorted((evaluation.get("per_task_image") or {}).items())
            if task not in graded and "(" not in task]


def vas_metric_text(metric: str | None) -> str:
    """How the card names the filter's VAS: "raw VAS", "normalized VAS", or a view's label."""
    if metric in ("raw", "normalized"):
        return f"{metric} VAS"
    return metric_label(metric) if metric else "VAS"
