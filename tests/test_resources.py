"""Resource limits: memory does not grow with the dataset; a full disk leaves the store readable.

- Memory (a cheap proxy of bench/memory.py): a child process writes N samples (templates made by
  the programmatic teacher, each cloned with its own incompressible ~150 KiB image) through the
  work store's seeds and vas stages, then runs the filter and publish over the store. Going from
  N=300 to N=1500 adds ~175 MiB of image data; the peak RSS must grow by far less than that.
- Disk full: ``write`` raising ``OSError(ENOSPC)`` in the middle of a shard (after part of the
  file is on disk) and in the middle of publish. The error surfaces (nothing silently dropped),
  the store reads exactly the shards committed before, no temp file stays, and the next run
  completes with the same result as a run that never failed.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.config import load_synth_config
from pipeline.store import WorkStore
from tests.support.reliability import (
    CI_CONFIG,
    REPO,
    output_overrides,
    published_rows,
    run_pipeline,
    stage_ids,
)

MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from tests.support.stages import PassthroughVAS
    from pipeline.seeds.stage import SeedStage
    from flows.config import load_synth_config
    from pipeline.executor import run_stage
    from pipeline.filtering.filter import run_filter
    from pipeline.ids import sample_id
    from pipeline.images import encode_png, image_record
    from pipeline.publishing.publish import publish
    from pipeline.seeds import SeedsConfig, iter_seeds
    from pipeline.synthesis.stages import StageConfig
    from tests.support.samples import teacher_stage
    from pipeline.store import WorkStore
    from pipeline.verify import VerifyStage

    sizes, root = [int(n) for n in sys.argv[1].split(",")], Path(sys.argv[2])
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    templates = list(iter_seeds(SeedsConfig(n=4, image_size=320)))
    for name in ("describe", "reason", "anchor"):
        with teacher_stage(name, StageConfig(), progress=False) as stage:
            templates = stage.run(templates)
    templates = PassthroughVAS().run(VerifyStage().run(templates))
    assert all(isinstance(t, dict) for t in templates), templates

    def clones(n, kind):
        for i in range(n):
            noise = np.random.default_rng(i).integers(0, 256, (192, 192, 4), dtype=np.uint8)
            image = image_record(encode_png(Image.fromarray(noise, "RGBA")))
            base = templates[i % len(templates)]
            new_id = sample_id([image["bytes"]], base["question"], base["source"])
            if kind == "seeds":
                keys = ("question", "gold_answer", "answer_type", "choices", "source", "difficulty", "scene")
                yield {**{k: base[k] for k in keys}, "id": new_id, "images": [image]}
            else:
                yield {**base, "id": new_id, "images": [image]}

    report = []
    for k, n in enumerate(sizes):  # small runs first: they warm the allocator pools
        out = root / f"{k}-{n}"
        overrides = [f"run.store_dir={out / 'store'}", f"publish.out_dir={out / 'published'}",
                     f"publish.cards_dir={out / 'cards'}", *sys.argv[4:]]
        config = load_synth_config(sys.argv[3], overrides)
        store = WorkStore(out / "store")
        run_stage(SeedStage(), store.stage("seeds"), clones(n, "seeds"), shard_size=64)
        stage, batch = store.stage("vas"), []
        for record in clones(n, "vas"):
            batch.append(record)
            if len(batch) == 64:
                stage.write(batch)
                batch = []
        stage.write(batch)
        after_store = peak()
        funnel = run_filter(config.filter, store, inputs_stage="vas", shard_size=64, progress=False)
        after_filter = peak()
        publish(config.publish, store.stage("filter").iter_records(), funnel=funnel.to_dict(),
                provenance={}, progress=False)
        image_bytes = sum(len(r["images"][0]["bytes"]) for r in store.stage("seeds").iter_records())
        report.append({"n": n, "store": after_store, "filter": after_filter, "publish": peak(),
                     "kept": funnel.steps.get("unique"), "image_mib": image_bytes / 2**20,
                       "out": str(out)})
    print(json.dumps(report))
""")


def peak_rss(sizes: list[int], root: Path, extra: tuple[str, ...] = ()) -> list[dict]:
    """Peak RSS (MiB) after each phase, for each size in turn, in one fresh process."""
    overrides = ["filter.vas_quantile=null", "seeds.image_size=320", "run.progress=false", *extra]
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, ",".join(map(str, sizes)), str(root),
                           str(CI_CONFIG), *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=400, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    _, small, large = peak_rss([300, 300, 1500], tmp_path)  # the first run only warms up
    assert small["kept"] == 300 and large["kept"] == 1500  # all distinct, all pass the filter
    added_data = large["image_mib"] - small["image_mib"]
    assert added_data > 150, large
    # ru_maxrss only grows: the larger run (second, in the same process) may not push the peak
    # much beyond the smaller run's. A run that held its samples would add at least the image data.
    # What it does add (~10-20 KiB per sample, whatever the image size) is per-sample metadata.
    growth = large["publish"] - small["publish"]
    assert growth < 0.25 * added_data, (small, large)
    assert len(published_rows(Path(large["out"]) / "published")) == 1500


# --------------------------------------------------------------------------- disk full

class DiskFull:
    """Replaces a writer: writes the first ``keep`` bytes for real, then fails with ENOSPC."""

    def __init__(self, real, fail_on_call: int = 1, keep: int = 512):
        self.real, self.fail_on_call, self.keep, self.calls = real, fail_on_call, keep, 0

    def __call__(self, table, where, *args, **kwargs):
        self.calls += 1
        if self.calls != self.fail_on_call:
            return self.real(table, where, *args, **kwargs)
        if hasattr(where, "write"):
            where.write(b"PAR1" + b"\0" * self.keep)
            where.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def small_config(root: Path):
    return load_synth_config(CI_CONFIG, output_overrides(root) + [
        "seeds.n=8", "seeds.image_size=320", "run.shard_size=2", "run.n_shards=1",
        "filter.vas_quantile=null"])


def store_rows(store: Path) -> dict[str, list[str]]:
    return {stage: sorted(stage_ids(store, stage)) for stage in
            ("seeds", "describe", "reason", "anchor", "verify", "vas", "filter")}


def test_disk_full_mid_shard_leaves_the_store_readable_and_the_next_run_completes(tmp_path, monkeypatch):
    import pipeline.store as store_module

    reference_root, root = tmp_path / "reference", tmp_path / "full"
    run_pipeline(small_config(reference_root), passthrough_vas=True)
    reference = published_rows(reference_root / "published")

    config = small_config(root)
    # the 6th shard write of the run fails half-way: seeds (4 shards) done, describe under way
    full = DiskFull(store_module.pq.write_table, fail_on_call=6)
    monkeypatch.setattr(store_module.pq, "write_table", full)
    with pytest.raises(OSError) as err:
        run_pipeline(config, passthrough_vas=True)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()

    store = root / "store"
    assert not [p for p in store.rglob(".tmp-*")], "a half-written shard was left behind"
    describe = WorkStore(store).stage("describe")
    assert describe.counts()["result"] == 2  # exactly the shard committed before the failure
    assert len(list(WorkStore(store).stage("seeds").iter_records())) == 8  # readable, whole
    assert not (root / "published").exists()

    run_pipeline(config, passthrough_vas=True)  # space is back: the run continues and completes
    assert published_rows(root / "published") == reference
    rows = store_rows(store)
    assert rows == store_rows(reference_root / "store")  # same ids, none twice


def test_disk_full_during_publish_keeps_the_published_folder_and_the_next_publish_completes(tmp_path, monkeypatch):
    import types

    import pyarrow.parquet as pq

    from pipeline.publishing import sharding

    root = tmp_path / "run"
    config = small_config(root)
    run_pipeline(config, passthrough_vas=True)
    before = published_rows(root / "published")
    manifest = (root / "published" / "avar_manifest.json").read_text()

    more = load_synth_config(CI_CONFIG, output_overrides(root) + [
        "seeds.n=12", "seeds.image_size=320", "run.shard_size=2", "run.n_shards=1",
        "filter.vas_quantile=null"])
    calls = {"n": 0}

    class FullDiskWriter(pq.ParquetWriter):
        """The second row group of the publish fails (the first file is already on disk)."""

        def write_table(self, table, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write_table(table, *args, **kwargs)

    # only the publish writer sees the full disk (the store's own writes go through pq too)
    proxy = types.SimpleNamespace(**{k: getattr(pq, k) for k in dir(pq) if not k.startswith("__")})
    proxy.ParquetWriter = FullDiskWriter
    monkeypatch.setattr(sharding, "pq", proxy)
    with pytest.raises(OSError):
        run_pipeline(more, passthrough_vas=True)
    monkeypatch.undo()
    assert calls["n"] == 2
    assert published_rows(root / "published") == before  # the old dataset is intact
    assert (root / "published" / "avar_manifest.json").read_text() == manifest

    run_pipeline(more, passthrough_vas=True)
    after = published_rows(root / "published")
    assert set(before) < set(after) and len(after) > len(before)
