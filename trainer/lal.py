"""The paper's LAL analysis as a command: VAS against accuracy across models on one probe set.

    python -m trainer.lal --models Qwen/Qwen2.5-VL-7B-Instruct outputs/sft outputs/agto \\
        --data AI4Math/MathVista --split testmini --out runs/lal

Each model is evaluated once by :func:`trainer.eval.evaluate` (accuracy, the paper's VAS, its
size-normalized form, the ratio of means and the attention budget of the user queries); the
result is cached under ``<out>/cache/`` keyed by the model, its weights' files and the probe
settings, so adding a model to the list costs one evaluation. Writes ``<out>/lal.md`` and
``<out>/lal.csv`` (one row per model), ``<out>/lal.png`` (VAS against accuracy, with Pearson's
and Spearman's r; the paper reports r = 0.9616 across its models) and ``<out>/lal.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

from pipeline.atomic import write_json_atomic
from pipeline.lens.budget import BUDGET_NAMES
from pipeline.stats import pearson, spearman
from trainer.eval import EvalConfig, evaluate

PAPER_R = 0.9616  # SPEC: Pearson r of VAS and accuracy across the paper's models
COLUMNS = ("model", "n", "accuracy", "vas", "vas_normalized", "vas_ratio_of_means",
           *[f"budget_{k}" for k in BUDGET_NAMES], "max_pixels")


def model_fingerprint(model: str) -> str:
    """The model id, plus the names, sizes and mtimes of a local folder's files (a retrained
    checkpoint in the same folder is evaluated again)."""
    path = Path(model)
    if not path.is_dir():
        return model
    files = sorted((p.relative_to(path).as_posix(), p.stat().st_size, int(p.stat().st_mtime))
                   for p in path.rglob("*") if p.is_file() and not p.name.startswith("eval_"))
    return json.dumps([str(path.resolve()), files])


def cache_key(model: str, config: EvalConfig) -> str:
    probe = {"data": config.data, "split": config.split, "max_samples": config.max_samples,
             "max_pixels": config.max_pixels, "max_new_tokens": config.max_new_tokens,
             "vas_layers": config.vas_layers, "format_hint": config.format_hint,
             "system_prompt": config.system_prompt}
    blob = json.dumps({"model": model_fingerprint(model), "probe": probe}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def evaluate_cached(model: str, base: EvalConfig, cache_dir: Path) -> tuple[dict, bool]:
    """(summary of ``model`` on the probe, whether it came from the cache)."""
    path = cache_dir / f"{Path(model.rstrip('/')).name}-{cache_key(model, base)}.json"
    if path.is_file():
        return json.loads(path.read_text()), True
    config = EvalConfig(**{**vars(base), "model": model})
    report = evaluate(config)
    vas = report.get("vas") or {}
    summary = {"model": model, "n": report["n"], "accuracy": report.get("accuracy"),
               "vas": vas.get("raw"), "vas_normalized": vas.get("normalized"),
               "vas_ratio_of_means": vas.get("ratio_of_means"), "max_pixels": report["max_pixels"],
               **{f"budget_{k}": (vas.get("budget") or {}).get(k) for k in BUDGET_NAMES}}
    write_json_atomic(path, summary)
    return summary, False


def scatter_png(rows: list[dict], r: float, rho: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=110)
    ax = fig.subplots()
    for row in rows:
        ax.scatter(row["vas"], 100 * row["accuracy"], color="#4c72b0")
        ax.annotate(Path(row["model"].rstrip("/")).name, (row["vas"], 100 * row["accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("VAS (paper: user queries, mean over layers, heads, tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"VAS vs accuracy: Pearson r = {r:.3f}, Spearman = {rho:.3f} (paper r = {PAPER_R})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def markdown(rows: list[dict], r: float, rho: float) -> str:
    keys = COLUMNS
    cell = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]
    lines += ["", (f"Pearson r (VAS, accuracy) = {r:.4f}; Spearman rho = {rho:.4f}; the paper: r = {PAPER_R} "
                   f"across {len(rows)} models here.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m trainer.lal", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="checkpoints or Hub ids (at least 2)")
    parser.add_argument("--data", required=True, help="probe set, as for trainer.eval")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="one image budget for every model (VAS grows with resolution); default: each checkpoint's own")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-format-hint", action="store_true",
                        help="ask the bare question (models trained without the <think>/<answer> instruction)")
    parser.add_argument("--out", required=True, help="folder for the table, plot and cache")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if len(args.models) < 2:
        parser.error("--models needs at least 2 models to correlate")
    out = Path(args.out)
    base = EvalConfig(model="", data=args.data, split=args.split, max_samples=args.max_samples,
                      max_pixels=args.max_pixels, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      format_hint=not args.no_format_hint)
    rows: list[dict] = []
    cached = 0
    for model in args.models:
        row, hit = evaluate_cached(model, base, out / "cache")
        rows.append(row)
        cached += hit
        print(f"{model}: accuracy {row['accuracy']:.3f}, VAS {row['vas']:.4g}{' (cached)' if hit else ''}", flush=True)
    xs, ys = [r["vas"] for r in rows], [r["accuracy"] for r in rows]
    r, rho = pearson(xs, ys), spearman(xs, ys)
    (out / "lal.md").write_text(markdown(rows, r, rho))
    with open(out / "lal.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    scatter_png(rows, r, rho, out / "lal.png")
    result = {"models": rows, "pearson_r": r, "spearman_rho": rho, "paper_r": PAPER_R,
              "evaluated": len(rows) - cached, "cached": cached}
    write_json_atomic(out / "lal.json", result)
    print(markdown(rows, r, rho))
    print(f"wrote {out / 'lal.md'}, {out / 'lal.csv'}, {out / 'lal.png'} ({cached} of {len(rows)} from the cache)")
    return result


if __name__ == "__main__":
    main()
