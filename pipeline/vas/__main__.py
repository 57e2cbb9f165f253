"""``python -m pipeline.vas``: score a work-store stage, a saved dataset or parquet/jsonl files.

    python -m pipeline.vas --model Qwen/Qwen2.5-VL-7B-Instruct --data runs/my/verify \\
        --out vas.parquet --queries response        # or --queries user (the paper's VAS)

Writes one row per sample (``status`` ok or the reject reason); ``.jsonl`` output resumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pipeline.atomic import atomic_file
from pipeline.executor import batched
from pipeline.images import image_cells
from pipeline.lens.budget import BUDGET_NAMES
from pipeline.paper import DEFAULT_SYSTEM_PROMPT
from pipeline.records import Reject
from pipeline.vas import VASConfig
from pipeline.vas.stage import VASStage


def read_records(path: str) -> Iterable[dict]:
    """Sample-like records from a work-store stage folder, a saved HF dataset, or parquet/jsonl
    file(s) with ``image``/``images``, ``question`` and ``response`` columns (a published AVAR
    dataset has ``problem`` and ``messages`` instead of ``question``: either is read)."""
    from pathlib import Path

    from pipeline.ids import sample_id
    from pipeline.store import StageStore, is_stage_folder

    root = Path(path)
    if is_stage_folder(root):
        yield from StageStore(root.parent, root.name).iter_records()
        return
    import datasets

    if root.is_dir() and ((root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists()):
        data = datasets.load_from_disk(str(root))
        data = data[next(iter(data))] if isinstance(data, datasets.DatasetDict) else data
    else:
        files = (sorted(root.glob("**/*.parquet")) or sorted(root.glob("**/*.jsonl"))) if root.is_dir() else [root]
        if not files:
            raise FileNotFoundError(f"{path}: no work-store shards, saved dataset, parquet or jsonl files")
        kind = "json" if files[0].suffix in (".jsonl", ".json") else "parquet"
        data = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    for index, row in enumerate(data):
        blobs = image_cells(row.get("images", row.get("image")))
        question = row.get("question") or row.get("problem") or _user_text(row.get("messages")) or ""
        rid = str(row.get("id") or sample_id(blobs, question, f"row-{index}"))
        yield {"id": rid, "question": question, "response": row.get("response"),
               "images": [{"bytes": blob} for blob in blobs], "source": row.get("source")}



def _unsupported_model(model: str) -> str | None:
    """Why ``model`` (a local checkpoint) cannot be scored, before any data is read; None when
    it can, or when only loading it will tell (a Hub id)."""
    from pathlib import Path

    from pipeline.vlm import adapter_for, resolve_model_name

    path = Path(resolve_model_name(model))
    if not (path / "config.json").is_file():
        return None
    import json
    try:
        adapter_for(json.loads((path / "config.json").read_text()).get("model_type"))
    except ValueError as err:
        return f"--model {model}: {err}"
    return None


def _user_text(messages) -> str | None:
    """The first user turn's text of a ``messages`` cell (rows without a question column)."""
    for message in messages or []:
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else "".join(
                part.get("text") or "" for part in content or [] if part.get("type") == "text")
    return None


def flat_columns(vas: dict) -> dict:
    """A VAS record as table columns: ``budget_<set>`` shares and ``vas_layer_<l>`` beside the
    paper's ``raw``/``normalized`` (per-layer budget shares stay in the work store's records)."""
    row = {k: v for k, v in vas.items() if k not in ("budget", "budget_per_layer", "per_layer")}
    row.update({f"budget_{name}": share for name, share in (vas.get("budget") or {}).items()})
    row.update({f"vas_layer_{layer}": value for layer, value in zip(vas.get("layers") or [], vas.get("per_layer") or [], strict=False)})
    return row


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    import polars as pl

    parser = argparse.ArgumentParser(prog="python -m pipeline.vas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="hub id or local folder of a supported family, or a tiny alias: "
                             "tiny, tiny-qwen3-vl, tiny-qwen3-vl-moe, tiny-gemma3")
    parser.add_argument("--data", required=True, help="work-store stage folder, saved HF dataset, parquet/jsonl")
    parser.add_argument("--out", required=True, help="scores as .parquet or .jsonl (jsonl resumes: done ids skipped)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers (default all)")
    parser.add_argument("--queries", choices=["user", "response"], default="response")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-pixels", type=int, default=262144)
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help="system turn written into every scored chat (recorded in each row)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    unsupported = _unsupported_model(args.model)
    if unsupported:
        parser.error(unsupported)
    config = VASConfig(model=args.model, queries=args.queries, layers=args.layers, batch_size=args.batch_size,
                       max_pixels=args.max_pixels, device=args.device, dtype=args.dtype,
                       system_prompt=args.system_prompt)
    out = Path(args.out)
    if out.suffix not in (".parquet", ".jsonl"):
        parser.error(f"--out must end in .parquet or .jsonl, got {out.name}")
    done: set[str] = set()
    if out.suffix == ".jsonl" and out.exists():
        done = {json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()}
    stage = VASStage(config)
    rows: list[dict] = []
    for chunk in batched((r for r in read_records(args.data) if r["id"] not in done), 64):
        new_rows = []
        for record, result in zip(chunk, stage.run(chunk), strict=True):
            if isinstance(result, Reject):
                new_rows.append({"id": record["id"], "status": result.reason, "message": result.message})
            else:
                new_rows.append({"id": record["id"], "status": "ok", **flat_columns(result["vas"])})
        if out.suffix == ".jsonl":
            with out.open("a") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in new_rows)
        rows += new_rows
    if out.suffix == ".parquet":
        with atomic_file(out) as fh:
            pl.DataFrame(rows, infer_schema_length=None).write_parquet(fh)
    scored = [r for r in rows if r["status"] == "ok"]
    if scored:
        raw = sum(r["raw"] for r in scored) / len(scored)
        normalized = sum(r["normalized"] for r in scored) / len(scored)
        print(f"VAS ({args.queries}) over {len(scored)} samples: raw {raw:.4f}, normalized {normalized:.4f}, "
              f"ratio of means {sum(r['ratio_of_means'] for r in scored) / len(scored):.4f}")
        shares = {name: sum(r[f"budget_{name}"] for r in scored) / len(scored) for name in BUDGET_NAMES}
        print("attention budget of the queries: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    skipped = len(rows) - len(scored)
    print(f"wrote {len(rows)} rows to {out} ({skipped} not scored{', ' + str(len(done)) + ' already done' if done else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

