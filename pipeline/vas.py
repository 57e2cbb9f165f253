"""Visual Attention Score (SPEC "VAS"): per-sample response VAS and model-level VAS.

* **response VAS** (**ours**, the filter's score): queries ``R``, one teacher-forced forward of
  the reference model over (images, question, synthesized answer);
* **model-level VAS** (the paper's): queries ``U``, prefill only, averaged over a probe set.

Both report the raw score and the size-normalised one (raw divided by ``|I| / |S|``), the token
counts, the layers and ``max_pixels`` (keep it fixed within a dataset: raw VAS grows with the
number of image tokens). Samples are scored in batches sorted by length (padding changes no
score: the lens is exact per row). Samples that cannot be scored are never dropped:

=========================  ==================================================================
``vas_no_system_tokens``   the chat has no system span (``|S| = 0``): the ratio is undefined
``vas_no_image_tokens``    no image token reached the model (``|I| = 0``)
``vas_no_query_tokens``    empty question/response span
``missing_field``          a record without ``question`` / ``response`` / ``images``
image reason codes         from :mod:`pipeline.images` (``image_corrupt``, ...)
=========================  ==================================================================

:class:`VASStage` (name ``"vas"``) adds ``record["vas"]`` in the work store, or rejects with the
codes above; ``python -m pipeline.vas`` scores a work-store stage or a parquet/HF dataset folder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from pipeline.attention import AttentionLens
from pipeline.images import ImageError, pil_images
from pipeline.objectives import DEFAULT_EPS, size_normalized_vas, vas_ratio
from pipeline.records import Reject

TINY_MODEL = "tiny"


@dataclass
class VASConfig:
    """How response VAS is computed (SPEC "VAS"; stage ``vas`` of the synthesis run)."""

    model: str = field(default="Qwen/Qwen2.5-VL-7B-Instruct", metadata={
        "help": "Reference model (hub id or local folder); 'tiny' = the built-in random tiny Qwen2.5-VL "
                "(tests and demo only: its scores mean nothing)."})
    queries: Literal["user", "response"] = field(default="response", metadata={
        "help": "Query tokens: 'response' = the synthesized answer (per-sample filter score), "
                "'user' = the question (the paper's model-level VAS, prefill only)."})
    layers: list[int] | None = field(default=None, metadata={
        "help": "Decoder layers averaged over (negative from the end); null = all layers (paper)."})
    batch_size: int = field(default=4, metadata={"help": "Samples per forward pass (sorted by length)."})
    max_pixels: int | None = field(default=262144, metadata={
        "help": "Image resize cap in pixels, fixed for the whole dataset so raw VAS stays comparable "
                "(reference SFT config: 262144); null = the processor's default."})
    eps: float = field(default=DEFAULT_EPS, metadata={"help": "eps in sum_I A / (sum_S A + eps)."})
    dtype: str = field(default="auto", metadata={
        "help": "Model dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32."})
    device: str | None = field(default=None, metadata={"help": "Torch device; null = cuda when available, else cpu."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self):
        if self.queries not in ("user", "response"):
            raise ValueError(f"vas.queries: expected 'user' or 'response', got {self.queries!r}")
        if self.batch_size < 1:
            raise ValueError(f"vas.batch_size: must be >= 1, got {self.batch_size}")
        if self.max_pixels is not None and self.max_pixels < 28 * 28:
            raise ValueError(f"vas.max_pixels: must be >= 784 (one 28x28 patch group) or null, got {self.max_pixels}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"vas.dtype: expected auto|bfloat16|float16|float32, got {self.dtype!r}")


@dataclass
class VASItem:
    """One sample to score: decoded images, question and (for response VAS) the answer."""

    key: str
    images: list
    question: str
    response: str | None = None


class ScoreError(ValueError):
    def __init__(self, reason: str, message: str, field: str | None = None):
        self.reason, self.message, self.field = reason, message, field
        super().__init__(f"{reason}: {message}")


def load_scoring_model(config: VASConfig):
    """(model, processor) for ``config.model`` on ``config.device`` in eval mode."""
    from pipeline.models import load_model_and_processor, tiny_model_path

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    name = tiny_model_path() if config.model == TINY_MODEL else config.model
    model, processor = load_model_and_processor(name, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval(), processor


def _conversation(item: VASItem, queries: str) -> list[dict]:
    content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": item.question}]
    turns = [{"role": "user", "content": content}]
    if queries == "response":
        turns.append({"role": "assistant", "content": item.response})
    return turns


def _length_estimate(item: VASItem, max_pixels: int | None) -> int:
    """Sort key: characters plus image tokens (an image token covers 28x28 pixels)."""
    text = len(item.question) + len(item.response or "")
    pixels = sum(min(im.width * im.height, max_pixels or im.width * im.height) for im in item.images)
    return text // 3 + pixels // (28 * 28)


def score_items(model, processor, items: Sequence[VASItem], config: VASConfig,
                model_name: str | None = None) -> list[dict | ScoreError]:
    """VAS record (``schemas/sample.schema.json#vas``) or :class:`ScoreError` per item, in order."""
    from pipeline.models import build_inputs
    from pipeline.spans import compute_spans

    lens = AttentionLens(model, layers=config.layers)
    device = next(model.parameters()).device
    results: list[dict | ScoreError | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: -_length_estimate(items[i], config.max_pixels))
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    base = {"model": model_name or config.model, "queries": config.queries, "max_pixels": config.max_pixels,
            "layers": list(lens.layers)}
    bar = tqdm(total=len(items), desc=f"VAS ({config.queries})", unit="sample", disable=not config.progress)
    for batch in batches:
        conversations = [_conversation(items[i], config.queries) for i in batch]
        inputs = build_inputs(processor, conversations, [items[i].images for i in batch],
                              padding_side="right", max_pixels=config.max_pixels)
        spans = compute_spans(inputs["input_ids"], inputs["attention_mask"], processor)
        query = spans.user if config.queries == "user" else spans.response
        with torch.no_grad(), lens.capture(query.to(device), spans.image.to(device), spans.system.to(device)) as cap:
            model(**inputs.to(device), logits_to_keep=1)
        raw = vas_ratio(cap, config.eps).cpu()
        n_image, n_system, n_query = spans.image.sum(1), spans.system.sum(1), query.sum(1)
        normalized = size_normalized_vas(raw, n_image, n_system)
        for row, i in enumerate(batch):
            results[i] = _result(base, float(raw[row]), float(normalized[row]), int(n_image[row]),
                                 int(n_system[row]), int(n_query[row]))
        bar.update(len(batch))
    bar.close()
    return results


def _result(base: dict, raw: float, normalized: float, n_image: int, n_system: int, n_query: int):
    if n_system == 0:
        return ScoreError("vas_no_system_tokens", "the chat has no system span, so the ratio is undefined")
    if n_image == 0:
        return ScoreError("vas_no_image_tokens", "no image token in the model input")
    if n_query == 0:
        return ScoreError("vas_no_query_tokens", f"the {base['queries']} span is empty")
    return {**base, "raw": raw, "normalized": normalized, "n_image_tokens": n_image, "n_system_tokens": n_system}


def item_from_record(record: dict, queries: str) -> VASItem:
    """The scoring input of a sample record; :class:`ScoreError` when it lacks what is needed."""
    rid = record.get("id") or "<no id>"
    question = record.get("question")
    if not isinstance(question, str) or not question:
        raise ScoreError("missing_field", f"record {rid} has no question", "$.question")
    response = record.get("response")
    if queries == "response" and (not isinstance(response, str) or not response):
        raise ScoreError("missing_field", f"record {rid} has no response to score", "$.response")
    if not record.get("images"):
        raise ScoreError("missing_field", f"record {rid} has no images", "$.images")
    try:
        images = pil_images(record)
    except ImageError as err:
        raise ScoreError(err.reason, f"record {rid}: {err.message}", "$.images") from None
    return VASItem(key=rid, images=images, question=question, response=response)


class VASStage:
    """Executor stage ``vas``: adds ``record["vas"]`` (response VAS by default) to each sample.

    The model is loaded on the first :meth:`run` and reused; pass ``model``/``processor`` to
    share one already loaded.
    """

    name = "vas"

    def __init__(self, config: VASConfig | None = None, model=None, processor=None):
        self.config = config or VASConfig()
        self.model, self.processor = model, processor

    def run(self, batch: list[dict]) -> list[dict | Reject]:
        if self.model is None:
            self.model, self.processor = load_scoring_model(self.config)
        outputs: list[dict | Reject | None] = [None] * len(batch)
        items, positions = [], []
        for pos, record in enumerate(batch):
            try:
                items.append(item_from_record(record, self.config.queries))
                positions.append(pos)
            except ScoreError as err:
                outputs[pos] = self._reject(record, err)
        scores = score_items(self.model, self.processor, items, self.config) if items else []
        for pos, score in zip(positions, scores, strict=True):
            record = batch[pos]
            outputs[pos] = self._reject(record, score) if isinstance(score, ScoreError) else {**record, "vas": score}
        return outputs

    def _reject(self, record: dict, err: ScoreError) -> Reject:
        return Reject(id=record.get("id") or "unknown", stage=self.name, reason=err.reason,
                      message=err.message, field=err.field, source=record.get("source"))


@dataclass
class ModelVAS:
    """Model-level VAS over a probe set: means of the per-sample scores that are defined."""

    raw: float
    normalized: float
    n_scored: int
    n_skipped: int
    per_sample: list[dict | ScoreError]


def model_vas(model, processor, items: Iterable[VASItem], layers: Sequence[int] | None = None,
              batch_size: int = 4, max_pixels: int | None = 262144, eps: float = DEFAULT_EPS,
              model_name: str = "model", progress: bool = True) -> ModelVAS:
    """The paper's VAS of ``model``: queries ``U``, prefill only, mean over layers, heads, tokens
    and the probe set (samples that cannot be scored are counted in ``n_skipped``)."""
    config = VASConfig(model=model_name, queries="user", layers=list(layers) if layers is not None else None,
                       batch_size=batch_size, max_pixels=max_pixels, eps=eps, progress=progress)
    scores = score_items(model, processor, list(items), config, model_name=model_name)
    good = [s for s in scores if not isinstance(s, ScoreError)]
    mean = (lambda key: sum(s[key] for s in good) / len(good)) if good else (lambda key: float("nan"))
    return ModelVAS(raw=mean("raw"), normalized=mean("normalized"), n_scored=len(good),
                    n_skipped=len(scores) - len(good), per_sample=scores)


# --------------------------------------------------------------------------------------- CLI
def _image_bytes(value) -> list[bytes]:
    """Image bytes of a dataset cell: bytes, {"bytes": ...} (HF Image), PIL image, or a list."""
    from pipeline.images import encode_png

    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [blob for v in value for blob in _image_bytes(v)]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [bytes(value)]
    if isinstance(value, dict):
        if value.get("bytes"):
            return [bytes(value["bytes"])]
        if value.get("path"):
            with open(value["path"], "rb") as fh:
                return [fh.read()]
        return []
    if hasattr(value, "save"):  # PIL image decoded by datasets
        return [encode_png(value)]
    raise ValueError(f"cannot read an image from a {type(value).__name__} cell")


def read_records(path: str) -> Iterable[dict]:
    """Sample-like records from a work-store stage folder, a saved HF dataset, or parquet/jsonl
    file(s) with ``image``/``images``, ``question`` and ``response`` columns."""
    from pathlib import Path

    from pipeline.ids import sample_id
    from pipeline.store import SHARD_GLOB, StageStore

    root = Path(path)
    if root.is_dir() and any(root.glob(SHARD_GLOB)):
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
        blobs = _image_bytes(row.get("images", row.get("image")))
        question = row.get("question") or ""
        rid = str(row.get("id") or sample_id(blobs, question, f"row-{index}"))
        yield {"id": rid, "question": question, "response": row.get("response"),
               "images": [{"bytes": blob} for blob in blobs], "source": row.get("source")}


def _chunks(records: Iterable[dict], size: int):
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json
    import os
    from pathlib import Path

    import polars as pl

    parser = argparse.ArgumentParser(prog="python -m pipeline.vas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id, local folder, or 'tiny'")
    parser.add_argument("--data", required=True, help="work-store stage folder, saved HF dataset, parquet/jsonl")
    parser.add_argument("--out", required=True, help="scores as .parquet or .jsonl (jsonl resumes: done ids skipped)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers (default all)")
    parser.add_argument("--queries", choices=["user", "response"], default="response")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-pixels", type=int, default=262144)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    config = VASConfig(model=args.model, queries=args.queries, layers=args.layers, batch_size=args.batch_size,
                       max_pixels=args.max_pixels, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    if out.suffix not in (".parquet", ".jsonl"):
        parser.error(f"--out must end in .parquet or .jsonl, got {out.name}")
    done: set[str] = set()
    if out.suffix == ".jsonl" and out.exists():
        done = {json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()}
    stage = VASStage(config)
    rows: list[dict] = []
    for chunk in _chunks((r for r in read_records(args.data) if r["id"] not in done), 64):
        new_rows = []
        for record, result in zip(chunk, stage.run(chunk), strict=True):
            if isinstance(result, Reject):
                new_rows.append({"id": record["id"], "status": result.reason, "message": result.message})
            else:
                new_rows.append({"id": record["id"], "status": "ok", **result["vas"]})
        if out.suffix == ".jsonl":
            with out.open("a") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in new_rows)
        rows += new_rows
    if out.suffix == ".parquet":
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        pl.DataFrame(rows, infer_schema_length=None).write_parquet(tmp)
        os.replace(tmp, out)
    scored = [r for r in rows if r["status"] == "ok"]
    if scored:
        raw = sum(r["raw"] for r in scored) / len(scored)
        normalized = sum(r["normalized"] for r in scored) / len(scored)
        print(f"VAS ({args.queries}) over {len(scored)} samples: raw {raw:.4f}, normalized {normalized:.4f}")
    skipped = len(rows) - len(scored)
    print(f"wrote {len(rows)} rows to {out} ({skipped} not scored{', ' + str(len(done)) + ' already done' if done else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
