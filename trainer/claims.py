"""The paper's claims in miniature, on the learned reference model: one command each.

    python -m trainer.claims lal            # VAS vs accuracy across the recipe's checkpoints and the blind model
    python -m trainer.claims agto           # plain SFT vs AGTO from a half-trained checkpoint, on the demo data
    python -m trainer.claims intervention   # a_img 0 .. 0.6: accuracy and image share of tiny-shapes

Each writes ``<out>/<claim>.md`` (a table and what the paper says), ``.json`` and ``.png``
(default ``docs/claims/``). What they need is built once under ``--work`` (default
``$AVAR_CACHE/claims``): the reference recipe re-run with its checkpoints kept and the model
trained on blank canvases (~15 minutes each on 2 cores), the held-out probe questions (scene
layouts no model trained on), and for ``agto`` the two fine-tuned models (``make demo`` first:
they train on its published dataset). Every number is measured by the command that prints it;
nothing is tuned to agree with the paper.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from pipeline.atomic import write_json_atomic
from pipeline.lens.budget import BUDGET_NAMES
from pipeline.vlm.reference import REFERENCE_ALIAS, REFERENCE_RECIPE, read_manifest, reference_path

PAPER = {"lal": "VAS and reasoning accuracy correlate across models: Pearson r = 0.9616 over 10 models.",
         "agto": "VAS rises from the base model to SFT on VARD data to AGTO (Qwen2.5-VL-7B: 7.5 -> 10.1 -> 13.8), "
                 "and so does accuracy (average over 7 benchmarks: 49.1 -> 51.0 -> 52.6).",
         "intervention": "Scaling image-key logits by (1 + a_img), a_img = 0.15, gains 1-2 points of accuracy "
                         "without training."}
PROBE_SIZE = 300
A_IMG = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def default_work() -> Path:
    import os
    return Path(os.environ.get("AVAR_CACHE") or Path.home() / ".cache" / "avar") / "claims"


def reference_run(work: Path) -> tuple[Path, list[Path]]:
    """(final model, checkpoints by step) of the reference recipe. The checkpoints are kept by
    ``python -m trainer.reference --checkpoints <work>/reference-<digest>/checkpoints``; when they
    are there the shipped ``tiny-shapes`` is their run's final model (the manifest's recipe digest
    says so), else the recipe is trained once more, checkpoints and all (~10 minutes)."""
    from trainer.reference import train

    folder = work / f"reference-{REFERENCE_RECIPE.digest()[:12]}"
    final = folder / "final"
    if read_manifest(final) is None and not (folder / "checkpoints").is_dir():
        print(f"training the reference recipe with its checkpoints into {folder} (~10 min)", flush=True)
        train(REFERENCE_RECIPE, final, checkpoints=folder / "checkpoints")
    if read_manifest(final) is None:
        final = reference_path()
    steps = sorted((folder / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return final, steps


def blind_model(work: Path) -> Path:
    """The reference recipe on blank canvases: a model that never saw a scene."""
    from trainer.reference import train

    recipe = replace(REFERENCE_RECIPE, blank_images=True, checkpoint_steps=())
    folder = work / f"blind-{recipe.digest()[:12]}"
    if read_manifest(folder) is None:
        print(f"training the blind model into {folder} (~10 min)", flush=True)
        train(recipe, folder)
    return folder


def probe(work: Path, tasks: tuple[str, ...] | None = None) -> Path:
    """Held-out questions (layouts no model trained on) of ``tasks``; default: the graded ones."""
    from trainer.reference import write_probe

    tasks = tasks or REFERENCE_RECIPE.graded_tasks
    folder = work / f"probe-{REFERENCE_RECIPE.digest()[:12]}-{'-'.join(tasks)}-{PROBE_SIZE}"
    if not (folder / "state.json").is_file():
        write_probe(REFERENCE_RECIPE, folder, PROBE_SIZE, tasks=tasks)
    return folder


def _label(model: str) -> str:
    path = Path(model)
    manifest = read_manifest(path) or {}
    if manifest.get("recipe", {}).get("blank_images"):
        return "blind (blank canvases)"
    if path.parent.name == "checkpoints":
        return f"checkpoint {path.name}"
    return f"final (step {manifest.get('step')})" if manifest.get("step") == REFERENCE_RECIPE.steps else path.name


def claim_lal(out: Path, work: Path) -> dict:
    from trainer import lal

    final, checkpoints = reference_run(work)
    models = [*map(str, checkpoints), str(final), str(blind_model(work))]
    result = lal.main(["--models", *models, "--data", str(probe(work)), "--out", str(work / "lal"),
                       "--no-format-hint", "--max-new-tokens", "48", "--batch-size", "32",
                       "--max-pixels", str(REFERENCE_RECIPE.max_pixels)])
    rows = [{"model": _label(r["model"]), **{k: r[k] for k in ("accuracy", "vas", "vas_normalized", "vas_ratio_of_means",
                                                             "budget_image", "budget_system")}}
            for r in result["models"]]
    summary = {"claim": "lal", "paper": PAPER["lal"], "rows": rows, "pearson_r": result["pearson_r"],
               "spearman_rho": result["spearman_rho"], "correlations": view_correlations(rows)}
    shutil.copyfile(work / "lal" / "lal.png", out / "lal.png")
    _write(out, "lal", summary, f"VAS (user queries, the paper's) against held-out accuracy of the reference "
                                f"run's checkpoints, its final model and the blind model: Pearson r = "
                                f"{result['pearson_r']:.3f}, Spearman rho = {result['spearman_rho']:.3f}.")
    return summary


def view_correlations(rows: list[dict]) -> list[dict]:
    """Pearson's and Spearman's r of accuracy with each view, with and without the blind model."""
    from pipeline.stats import pearson, spearman

    seeing = [r for r in rows if not r["model"].startswith("blind")]
    out = []
    for view in ("vas", "vas_normalized", "vas_ratio_of_means", "budget_image", "budget_system"):
        row = {"view": view}
        for label, subset in (("all models", rows), ("without the blind model", seeing)):
            xs, ys = [r[view] for r in subset], [r["accuracy"] for r in subset]
            row[f"Pearson, {label}"], row[f"Spearman, {label}"] = pearson(xs, ys), spearman(xs, ys)
        out.append(row)
    return out


def _evaluate(model: str, data: Path, max_new_tokens: int, cache: Path) -> dict:
    from trainer.eval import EvalConfig
    from trainer.lal import evaluate_cached

    base = EvalConfig(model="", data=str(data), split="train", max_new_tokens=max_new_tokens, batch_size=32,
                      max_pixels=REFERENCE_RECIPE.max_pixels, format_hint=True)
    summary, _ = evaluate_cached(model, base, cache)
    return summary


def claim_agto(out: Path, work: Path, data: Path, steps: int) -> dict:
    from trainer import sft
    from trainer.configs import AGTOConfig, parse_config

    if not any(data.glob("data/train-*")):
        raise SystemExit(f"{data}: no published dataset; run `make demo` first (AGTO fine-tunes on it)")
    _, checkpoints = reference_run(work)
    half = next(p for p in checkpoints if int(p.name.split("-")[1]) >= REFERENCE_RECIPE.steps // 2)
    trained = {}
    for name, weight in (("sft", 0.0), ("agto", 0.15)):
        folder = work / f"agto-{half.name}-{name}-{steps}"
        if not (folder / "config.json").is_file():
            sft.train(parse_config(AGTOConfig, [
                "--config", "configs/sft_shapes.yaml", "--model_name_or_path", str(half), "--dataset", str(data),
                "--output_dir", str(folder), "--max_steps", str(steps),
                "--alpha", str(weight), "--beta", str(weight)]))
        trained[name] = folder
    probe_data = probe(work, tuple(t for t in REFERENCE_RECIPE.tasks))  # the demo's question types
    rows = []
    for label, model in (("base (" + half.name + ")", half), ("plain SFT", trained["sft"]), ("AGTO", trained["agto"])):
        r = _evaluate(str(model), probe_data, 256, work / "eval-cache")
        rows.append({"model": label, "accuracy": r["accuracy"], "vas": r["vas"], "vas_normalized": r["vas_normalized"],
                     "vas_ratio_of_means": r["vas_ratio_of_means"],
                     **{f"budget_{k}": r[f"budget_{k}"] for k in BUDGET_NAMES}})
    summary = {"claim": "agto", "paper": PAPER["agto"], "rows": rows, "base": str(half), "data": str(data),
               "steps": steps}
    _bars(rows, ("accuracy", "vas", "budget_image"), out / "agto.png",
          f"fine-tuned {steps} steps from {half.name} on {data.name}")
    _write(out, "agto", summary, f"{steps} steps of plain SFT and of AGTO (alpha = beta = 0.15) from the "
                                 f"half-trained checkpoint {half.name} on the demo's published data; all three "
                                 f"evaluated on the held-out probe ({PROBE_SIZE} questions).")
    return summary


def claim_intervention(out: Path, work: Path) -> dict:
    import torch

    from pipeline.lens.intervention import InterventionConfig
    from pipeline.vlm import load_model_and_processor
    from trainer.data import eval_examples, load_table
    from trainer.eval import EvalConfig, measure

    model, processor = load_model_and_processor(REFERENCE_ALIAS, dtype=torch.float32)
    model.eval()
    config = EvalConfig(model=REFERENCE_ALIAS, data=str(probe(work)), split="train", max_new_tokens=48,
                        batch_size=32, max_pixels=REFERENCE_RECIPE.max_pixels, format_hint=False)
    examples = eval_examples(load_table(config.data, split="train"), format_hint=False)
    rows = []
    for a_img in A_IMG:
        setting = None if a_img == 0 else InterventionConfig(a_img=a_img, a_sys=0.0)
        r = measure(model, processor, examples, config, setting)
        vas = r["vas"]
        rows.append({"a_img": a_img, "accuracy": r["accuracy"], "vas": vas["raw"],
                     "image_share": vas["budget"]["image"], "system_share": vas["budget"]["system"]})
        print(f"a_img {a_img}: accuracy {r['accuracy']:.3f}, image share {vas['budget']['image']:.3f}", flush=True)
    summary = {"claim": "intervention", "paper": PAPER["intervention"], "rows": rows, "a_sys": 0.0,
               "model": REFERENCE_ALIAS}
    _lines(rows, out / "intervention.png")
    _write(out, "intervention", summary, f"The training-free intervention on `{REFERENCE_ALIAS}` (all layers, "
                                         f"a_sys = 0), held-out probe of {PROBE_SIZE} questions; image share = the "
                                         f"user queries' attention share on the image.")
    return summary


def _write(out: Path, name: str, summary: dict, caption: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", summary)
    rows = summary["rows"]
    keys = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
             *("| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows)]
    command = f"python -m trainer.claims {name}"
    text = [f"# {name}: the paper's claim in miniature", "", f"`{command}`", "", caption, "", *table, ""]
    if "pearson_r" in summary:
        text += [f"Pearson r = {summary['pearson_r']:.4f}, Spearman rho = {summary['spearman_rho']:.4f}.", ""]
    if summary.get("correlations"):
        keys = list(summary["correlations"][0])
        text += ["Correlation of accuracy with each view:", "", "| " + " | ".join(keys) + " |",
                 "|" + "---|" * len(keys), *("| " + " | ".join(cell(r[k]) for k in keys) + " |"
                                            for r in summary["correlations"]), ""]
    text += [f"![{name}]({name}.png)", "", f"The paper: {summary['paper']}", ""]
    (out / f"{name}.md").write_text("\n".join(text))
    print("\n".join(table))
    print(f"wrote {out / name}.md, .json, .png")


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure


def _bars(rows: list[dict], keys: tuple[str, ...], path: Path, title: str) -> None:
    fig = _figure()(figsize=(9, 3.2), dpi=110)
    for ax, key in zip(fig.subplots(1, len(keys)), keys, strict=True):
        ax.bar([r["model"] for r in rows], [r[key] for r in rows], color=["#999999", "#4c72b0", "#c44e52"])
        ax.set_title(key + (" (log scale)" if key == "vas" else ""), fontsize=9)
        if key == "vas":
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def _lines(rows: list[dict], path: Path) -> None:
    fig = _figure()(figsize=(6, 3.5), dpi=110)
    ax = fig.subplots()
    xs = [r["a_img"] for r in rows]
    ax.plot(xs, [r["accuracy"] for r in rows], marker="o", label="accuracy")
    ax.plot(xs, [r["image_share"] for r in rows], marker="s", label="image share (user queries)")
    ax.set_xlabel("a_img (image-key logits x (1 + a_img))")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m trainer.claims", description=__doc__.split("\n")[0])
    parser.add_argument("claim", choices=("lal", "agto", "intervention"))
    parser.add_argument("--out", default="docs/claims", help="folder for <claim>.md/.json/.png")
    parser.add_argument("--work", default=None, help="folder for the models it trains (default $AVAR_CACHE/claims)")
    parser.add_argument("--data", default="outputs/avar-demo-procedural", help="agto: the published demo data")
    parser.add_argument("--steps", type=int, default=1000, help="agto: fine-tuning steps of each run")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    torch.set_num_threads(2)
    out, work = Path(args.out), Path(args.work) if args.work else default_work()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if args.claim == "lal":
        return claim_lal(out, work)
    if args.claim == "agto":
        return claim_agto(out, work, Path(args.data), args.steps)
    return claim_intervention(out, work)


if __name__ == "__main__":
    main()
