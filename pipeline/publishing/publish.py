"""Publish filtered samples as a Hugging Face dataset folder (Hub layout), with exports and a card.

Layout of ``out_dir``::

    data/train-00000-of-0000N.parquet   rows sorted by id, images embedded (viewer-ready)
    data/test-00000-of-0000M.parquet
    README.md                           the data card (also in data_cards/<dataset>/)
    vas_histogram.png, gallery/*.png    the card's figures
    avar_manifest.json                  content digest and file hashes (re-publish no-op check)

``datasets.load_dataset(out_dir)`` loads both splits with images decoded (the card's YAML lists
the data files). Exports for other trainers go to ``exports_dir`` (EasyR1/verl parquet and
LLaMA-Factory sharegpt JSON + image files), derived from the published shards.

Records stream in once and never sit in memory together: each row is spilled to its own file,
then the shards are written in id order one row group at a time (pipeline.publishing.sharding); peak memory
is one row group plus the ids. The split is a hash of (seed, id), so it never changes when data is added.
Re-publishing identical data is a no-op: the manifest's digest matches and no file is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from pipeline.atomic import write_if_changed
from pipeline.errors import PermanentError
from pipeline.ids import file_sha256, stable_hash
from pipeline.publishing.cards import CardStats, assert_no_secrets, write_card
from pipeline.publishing.exports import export_easyr1, export_llamafactory
from pipeline.publishing.sharding import RowSpill, plan_shards, write_shards
from pipeline.questions import question_text

FORMAT_VERSION = "1"
MANIFEST = "avar_manifest.json"
ROW_GROUP_ROWS = 64  # small row groups keep the Hub viewer responsive with embedded images

_TEXT = datasets.Value("string")
FEATURES = datasets.Features({
    "id": _TEXT,
    "images": datasets.List(datasets.Image()),
    "problem": _TEXT,
    "answer": _TEXT,
    "answer_type": _TEXT,
    "choices": datasets.List(_TEXT),
    "response": _TEXT,
    "messages": datasets.List({"role": _TEXT, "content": datasets.List({"type": _TEXT, "text": _TEXT})}),
    "vas": datasets.Value("float64"),
    "vas_normalized": datasets.Value("float64"),
    "source": _TEXT,
    "teachers": datasets.List({"stage": _TEXT, "backend": _TEXT, "model": _TEXT}),
    "prompt_versions": datasets.List({"stage": _TEXT, "name": _TEXT, "version": _TEXT, "sha256": _TEXT}),
    "n_anchors": datasets.Value("int32"),
    "programmatic": datasets.Value("bool"),
})


class PublishError(RuntimeError, PermanentError):
    """Publishing cannot proceed; the message says which record, file or setting is to blame."""


@dataclass
class PublishConfig:
    dataset_name: str = field(default="avar-vard", metadata={"help": "Dataset name: folder name of the card (data_cards/<name>/) and the default card title."})
    out_dir: str = field(default="outputs/avar-vard", metadata={"volatile": True, "help": "Local folder of the published dataset (Hub layout: data/*.parquet + README.md)."})
    cards_dir: str = field(default="data_cards", metadata={"volatile": True, "help": "Root folder of the data cards; the card goes to <cards_dir>/<dataset_name>/README.md."})
    exports: list[str] = field(default_factory=lambda: ["easyr1", "llamafactory"], metadata={"help": "Extra formats to write: 'easyr1' (EasyR1/verl parquet), 'llamafactory' (sharegpt JSON + images + dataset_info.json)."})
    exports_dir: str | None = field(default=None, metadata={"volatile": True, "help": "Folder for the exports; null: <out_dir>-exports (kept out of the Hub upload)."})
    test_fraction: float = field(default=0.05, metadata={"help": "Fraction of samples in the test split, assigned by a hash of (seed, id): stable as data grows."})
    seed: int = field(default=0, metadata={"help": "Salt of the split hash and of the card's gallery choice."})
    max_shard_bytes: int = field(default=500_000_000, metadata={"help": "Target size of one parquet shard (bytes of images + text before compression)."})
    license: str = field(default="cc-by-4.0", metadata={"help": "License id for the card's YAML (Hub license identifiers)."})
    language: list[str] = field(default_factory=lambda: ["en"], metadata={"help": "Language codes for the card."})
    task_categories: list[str] = field(default_factory=lambda: ["visual-question-answering", "image-text-to-text"], metadata={"help": "Hub task categories for the card."})
    tags: list[str] = field(default_factory=lambda: ["reasoning", "multimodal", "visual-anchoring", "avar", "synthetic"], metadata={"help": "Hub tags for the card."})
    pretty_name: str | None = field(default=None, metadata={"help": "Human-readable title of the card; null: dataset_name."})
    gallery_size: int = field(default=12, metadata={"help": "Samples shown in the card's gallery (thumbnails + anchored reasoning)."})
    push: bool = field(default=False, metadata={"volatile": True, "help": "Upload the folder to the Hugging Face Hub after writing it (token from $HF_TOKEN only)."})
    repo_id: str | None = field(default=None, metadata={"volatile": True, "help": "Hub dataset repo, e.g. 'org/avar-vard'; required when push is true."})
    private: bool = field(default=True, metadata={"volatile": True, "help": "Create the Hub repo as private (when it does not exist yet)."})
    revision: str = field(default="main", metadata={"volatile": True, "help": "Hub branch to push to (created when missing)."})

    def __post_init__(self):
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"publish.test_fraction: must be in [0, 1), got {self.test_fraction}")
        if self.max_shard_bytes < 1_000_000:
            raise ValueError(f"publish.max_shard_bytes: must be >= 1000000, got {self.max_shard_bytes}")
        unknown = sorted(set(self.exports) - {"easyr1", "llamafactory"})
        if unknown:
            raise ValueError(f"publish.exports: unknown formats {unknown}; known: easyr1, llamafactory")
        if not self.dataset_name or "/" in self.dataset_name:
            raise ValueError(f"publish.dataset_name: a plain folder name is needed, got {self.dataset_name!r}")
        if self.push and not self.repo_id:
            raise ValueError("publish.repo_id: required when publish.push is true")

    def exports_path(self) -> Path:
        return Path(self.exports_dir) if self.exports_dir else Path(f"{Path(self.out_dir)}-exports")


@dataclass
class PublishResult:
    out_dir: Path
    card_path: Path
    splits: dict[str, int]
    files: list[str]
    digest: str
    changed: bool
    exports: dict[str, str] = field(default_factory=dict)
    pushed_url: str | None = None

    @property
    def empty(self) -> bool:
        """Nothing survived: no dataset was written (the card still shows the funnel)."""
        return not self.splits


def split_of(sample_id: str, test_fraction: float, seed: int) -> str:
    """'test' for a stable pseudo-random ``test_fraction`` of ids, else 'train'."""
    h = int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:15], 16) / 16**15
    return "test" if h < test_fraction else "train"


def published_row(record: dict) -> dict:
    """One dataset row (arrow-ready: images as {bytes, path}) from a filtered sample record."""
    rid = record.get("id")
    for key in ("id", "images", "question", "gold_answer", "response"):
        if not record.get(key):
            raise PublishError(f"record {rid or '<no id>'}: field $.{key}: missing or empty")
    vas = record.get("vas") or {}
    if not isinstance(vas.get("raw"), (int, float)) or not isinstance(vas.get("normalized"), (int, float)):
        raise PublishError(f"record {rid}: field $.vas: raw and normalized VAS are required to publish")
    images = record["images"]
    for i, im in enumerate(images):
        if not isinstance(im.get("bytes"), (bytes, bytearray)) or not im["bytes"]:
            raise PublishError(f"record {rid}: field $.images[{i}].bytes: no image bytes")
    choices = [str(c) for c in record.get("choices") or []] or None
    stages = record.get("stages") or {}
    user_text = question_text(record["question"], choices, format_hint=True)
    return {
        "id": rid,
        "images": [{"bytes": bytes(im["bytes"]), "path": None} for im in images],
        "problem": question_text(record["question"], choices, format_hint=False),
        "answer": str(record["gold_answer"]),
        "answer_type": record.get("answer_type"),
        "choices": choices,
        "response": record["response"],
        "messages": [
            {"role": "user", "content": [*({"type": "image", "text": None} for _ in images),
                                         {"type": "text", "text": user_text}]},
            {"role": "assistant", "content": [{"type": "text", "text": record["response"]}]}],
        "vas": float(vas["raw"]),
        "vas_normalized": float(vas["normalized"]),
        "source": record.get("source"),
        "teachers": [{"stage": s, **{k: (stages[s].get("teacher") or {}).get(k) for k in ("backend", "model")}}
                     for s in stages],
        "prompt_versions": [{"stage": s, **{k: (stages[s].get("prompt") or {}).get(k) for k in ("name", "version", "sha256")}}
                            for s in stages],
        "n_anchors": int(record.get("n_anchors") or 0),
        "programmatic": bool(record.get("programmatic")),
    }


def row_digest(row: dict) -> str:
    """Content hash of a row, image bytes hashed rather than serialised."""
    light = dict(row, images=[hashlib.sha256(im["bytes"]).hexdigest() for im in row["images"]])
    return stable_hash(light)


def _row_bytes(row: dict) -> int:
    return sum(len(im["bytes"]) for im in row["images"]) + len(row["response"]) + 2 * len(row["problem"]) + 512


def _manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _unchanged(out_dir: Path, digest: str) -> bool:
    manifest = _manifest(out_dir)
    if not manifest or manifest.get("digest") != digest:
        return False
    return all((out_dir / rel).is_file() and (out_dir / rel).stat().st_size == meta["bytes"]
               for rel, meta in manifest.get("files", {}).items())


def _install(staging: Path, out_dir: Path, new_files: list[Path]) -> dict[str, dict]:
    """Move staged shards into ``out_dir/data`` (identical files left untouched); drop stale shards."""
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for staged in new_files:
        target = data_dir / staged.name
        sha = file_sha256(staged)
        if not (target.is_file() and file_sha256(target) == sha):
            os.replace(staged, target)
        files[f"data/{staged.name}"] = {"sha256": sha, "bytes": target.stat().st_size}
    for old in data_dir.glob("*-of-*.parquet"):
        if f"data/{old.name}" not in files:
            old.unlink()
    return files


def _remove_dead_staging(out_dir: Path) -> None:
    """Delete ``.staging-<pid>`` folders left by publishes that were killed (their pid is gone)."""
    for folder in out_dir.glob(".staging-*"):
        pid = folder.name.removeprefix(".staging-")
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def publish(config: PublishConfig, records: Iterable[dict], funnel: dict | None = None,
            provenance: dict | None = None, progress: bool = True) -> PublishResult:
    """Write the dataset folder, its card and exports; push to the Hub when configured.

    ``records`` is streamed once (e.g. ``WorkStore(root).stage("filter").iter_records()``);
    ``funnel`` is the filter's funnel (dict); ``provenance`` is ``{"config_digest", "config"}``
    of the synthesis run (public fields only; prices per stage are read from it for the card).
    """
    if config.push:
        _hub_token()  # refuse before any work, not after writing the whole dataset
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(out_dir)
    staging = out_dir / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    stats = CardStats(gallery_size=config.gallery_size, seed=config.seed)
    sizes: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    digests: list[tuple[str, str]] = []
    seen: set[str] = set()
    try:
        spill = RowSpill(staging / "rows", FEATURES)
        for record in tqdm(records, desc="publish: read", unit="sample", disable=not progress):
            row = published_row(record)
            if row["id"] in seen:
                raise PublishError(f"record {row['id']}: field $.id: appears twice in the input")
            seen.add(row["id"])
            split = split_of(row["id"], config.test_fraction, config.seed)
            sizes[split].append((row["id"], _row_bytes(row)))
            digests.append((row["id"], row_digest(row)))
            stats.add(record, split)
            spill.add(row)
        if not seen:
            return _publish_nothing(config, out_dir, stats, funnel, provenance)
        splits = [s for s in ("train", "test") if sizes[s]]
        plans = {s: plan_shards(sizes[s], config.max_shard_bytes) for s in splits}
        digest = stable_hash([FORMAT_VERSION, FEATURES.to_dict(), config.test_fraction, config.seed,
                              config.max_shard_bytes, sorted(digests)])
        changed = not _unchanged(out_dir, digest)
        if changed:
            (staging / "data").mkdir()
            with tqdm(total=len(seen), desc="publish: write", unit="sample", disable=not progress) as bar:
                staged = write_shards(spill, plans, staging / "data", ROW_GROUP_ROWS, progress=bar.update)
            files = _install(staging, out_dir, staged)
            manifest = {"format_version": FORMAT_VERSION, "digest": digest, "files": files,
                        "splits": {s: len(sizes[s]) for s in splits}}
            write_if_changed(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        files = sorted(_manifest(out_dir)["files"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    split_info = {s: {"num_examples": len(sizes[s]), "num_bytes": sum(n for _, n in sizes[s])} for s in splits}
    exports = _write_exports(config, out_dir, splits, digest)
    card_dir = Path(config.cards_dir) / config.dataset_name
    card_path = write_card(card_dir, dataset_name=config.dataset_name, stats=stats, features=FEATURES,
                           splits=split_info, data_files={s: f"data/{s}-*" for s in splits},
                           license=config.license, language=config.language,
                           task_categories=config.task_categories, tags=config.tags, funnel=funnel,
                           provenance=provenance, repo_id=config.repo_id or str(out_dir), pretty_name=config.pretty_name,
                           exports={k: str(v) for k, v in exports.items()}, dataset_digest=digest)
    _copy_card(card_dir, out_dir)
    result = PublishResult(out_dir=out_dir, card_path=card_path, splits={s: len(sizes[s]) for s in splits},
                           files=files, digest=digest, changed=changed, exports={k: str(v) for k, v in exports.items()})
    if config.push:
        result.pushed_url = push_to_hub(config, out_dir)
    return result


def _publish_nothing(config: PublishConfig, out_dir: Path, stats: CardStats, funnel: dict | None,
                     provenance: dict | None) -> PublishResult:
    """No sample survived: write no dataset (a folder from an earlier publish is left as it
    was, and not pushed), only the card, which shows the funnel and every reject reason."""
    card_dir = Path(config.cards_dir) / config.dataset_name
    card_path = write_card(card_dir, dataset_name=config.dataset_name, stats=stats, features=FEATURES,
                           splits={}, data_files={}, license=config.license, language=config.language,
                           task_categories=config.task_categories, tags=config.tags, funnel=funnel,
                           provenance=provenance, repo_id=config.repo_id or str(out_dir),
                           pretty_name=config.pretty_name, dataset_digest=None)
    return PublishResult(out_dir=out_dir, card_path=card_path, splits={}, files=[], digest="",
                         changed=False)


def _copy_card(card_dir: Path, out_dir: Path) -> None:
    """The card and its figures into the dataset folder, so the Hub page renders the same card."""
    wanted = set()
    for src in [card_dir / "README.md", *card_dir.glob("*.png"), *sorted((card_dir / "gallery").glob("*.png"))]:
        rel = src.relative_to(card_dir)
        write_if_changed(out_dir / rel, src.read_bytes())
        wanted.add(out_dir / rel)
    for stale in (out_dir / "gallery").glob("*.png") if (out_dir / "gallery").exists() else ():
        if stale not in wanted:
            stale.unlink()


def _write_exports(config: PublishConfig, out_dir: Path, splits: list[str], digest: str) -> dict[str, Path]:
    """Exports from the published shards; skipped when the export folder already holds this digest."""
    out: dict[str, Path] = {}
    if not config.exports:
        return out
    root = config.exports_path()
    shards = {s: sorted((out_dir / "data").glob(f"{s}-*-of-*.parquet")) for s in splits}
    for name, writer in (("easyr1", export_easyr1), ("llamafactory", export_llamafactory)):
        if name not in config.exports:
            continue
        folder = root / name
        stamp = folder / ".avar_export_digest"
        if not (stamp.is_file() and stamp.read_text() == digest):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            writer(shards, folder, dataset_name=config.dataset_name, features=FEATURES)
            stamp.write_text(digest)
        out[name] = folder
    return out


def _hub_token() -> str:
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PublishError("push to the Hub requested but $HF_TOKEN is not set; export a token with "
                           "write access (it is read from the environment only), or set publish.push: false")
    return token


def push_to_hub(config: PublishConfig, out_dir: str | os.PathLike) -> str:
    """Upload ``out_dir`` to the Hub dataset repo ``config.repo_id``; returns the commit URL.

    The token comes from ``$HF_TOKEN`` only and is handed straight to huggingface_hub; it is never
    logged, written to a file or put into provenance.
    """
    token = _hub_token()
    if not config.repo_id:
        raise PublishError("push to the Hub requested but publish.repo_id is not set")
    from huggingface_hub import HfApi

    out_dir = Path(out_dir)
    assert_no_secrets((out_dir / "README.md").read_text(encoding="utf-8"), str(out_dir / "README.md"))
    api = HfApi(token=token)
    api.create_repo(config.repo_id, repo_type="dataset", private=config.private, exist_ok=True)
    if config.revision != "main":
        api.create_branch(config.repo_id, repo_type="dataset", branch=config.revision, exist_ok=True)
    info = api.upload_folder(repo_id=config.repo_id, repo_type="dataset", folder_path=str(out_dir),
                             revision=config.revision, ignore_patterns=[".staging-*", ".*"],
                             commit_message=f"Publish {config.dataset_name} ({_manifest(out_dir)['digest'][:12]})")
    return str(getattr(info, "commit_url", info))
