"""The synth flow end to end (ephemeral Prefect in a subprocess): config errors, publish, resume.

Runs ``python -m flows.synth`` on configs/ci_small.yaml (~20 procedural seeds, programmatic
teachers, tiny random-weight Qwen2.5-VL for VAS) exactly as a user would.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
from collections import Counter

import datasets
import pytest

from flows.synth import main, synth
from pipeline.configio import ConfigError
from tests.support.flows import (
    CI_CONFIG,
    CI_DATASET,
    REPO,
    cli_args,
    flow_env,
    last_summary,
    published_ids,
    run_overrides,
    stage_row_ids,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_bad_config_fails_before_any_work(tmp_path):
    # Not capsys: Prefect's log handler would keep capsys's stream, closed after this test.
    store = tmp_path / "store"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--config", str(CI_CONFIG), "--set", f"run.store_dir={store}",
                     "--set", "stages.reason.teacher.max_concurrency=ten"])
    assert code == 2
    assert "stages.reason.teacher.max_concurrency: expected int, got 'ten'" in err.getvalue()
    assert not store.exists()  # nothing ran: the config is checked before the flow starts
    with contextlib.redirect_stderr(err):
        assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in err.getvalue()


def test_load_synth_config_validates_everything():
    from flows.config import load_synth_config
    config = load_synth_config(CI_CONFIG, ["run.n_shards=3"])
    assert config.run.n_shards == 3
    for bad, message in [
        ("run.runner=dask", "run.runner: expected one of 'thread' | 'ray', got 'dask'"),
        ("stages.describe.teacher.backend=gemini", "stages.describe.teacher.backend: expected one of"),
        ("stages.anchor.teacher.api_key=sk-1", "stages.anchor.teacher.api_key: secrets never go in a config"),
        ("filter.min_anchors=0", "filter.min_anchors: must be >= 1"),
        ("seeds.nn=3", "seeds.nn: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace(".", r"\.")):
            load_synth_config(CI_CONFIG, [bad])


@pytest.fixture(scope="module")
def prefect_api():
    """One temporary Prefect server (own SQLite) for the in-process runs of this module."""
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_in_process(root, extra: list[str] = ()) -> dict:
    """The flow called directly (same code as the CLI, without paying imports and a server start)."""
    return synth(config_path=str(CI_CONFIG), overrides=run_overrides(root) + list(extra))


@pytest.fixture(scope="module")
def reference_run(prefect_api, tmp_path_factory):
    """One complete run of the small config: (root, published ids)."""
    root = tmp_path_factory.mktemp("flow_ref")
    summary = run_in_process(root)
    assert summary["published"]["out_dir"] == str(root / "published")
    return root, published_ids(root / "published")


def test_flow_publishes_a_loadable_dataset(reference_run):
    root, ids = reference_run
    assert len(ids) >= 5, "the small config should keep a handful of samples"
    assert len(ids) == len(set(ids))
    dataset = datasets.load_dataset(str(root / "published"))
    assert sum(len(split) for split in dataset.values()) == len(ids)
    row = dataset["train"][0]
    assert row["response"].startswith("<think>") and row["images"]
    assert row["images"][0].size[0] > 0  # decoded PIL image
    summary = last_summary(root / "store")
    assert summary["funnel"]["steps"]["unique"] == len(ids)
    assert (root / "cards" / CI_DATASET / "README.md").exists()
    for stage in ("seeds", "describe", "reason", "anchor", "verify", "vas"):
        rows = stage_row_ids(root / "store", stage)
        assert rows and len(rows) == len(set(rows)), f"{stage}: duplicate or missing ids"


def test_rerun_is_a_no_op(reference_run):
    root, ids = reference_run
    summary = run_in_process(root)
    assert summary["seeds"]["results"] == 0 and summary["seeds"]["skipped"] == 20
    assert all(r["results"] == 0 and r["rejects"] == 0 for reports in summary["stages"].values()
               for r in reports)
    assert published_ids(root / "published") == ids
    assert summary["published"]["changed"] is False  # same data: publish rewrote nothing


def test_kill_9_mid_run_then_resume_gives_the_same_dataset(reference_run, tmp_path):
    """``python -m flows.synth`` killed with SIGKILL mid-run (with its temporary Prefect
    server: the whole process group), then run again: same dataset, no id written twice."""
    _, reference_ids = reference_run
    env = flow_env(tmp_path / "prefect")
    extra = ["run.shard_size=2"]  # many small shards to kill between
    log_path = tmp_path / "killed_run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cli_args(run_overrides(tmp_path) + extra), cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        reason_dir = tmp_path / "store" / "reason"
        wait_for(lambda: len(list(reason_dir.rglob("part-*.parquet"))) >= 2 or proc.poll() is not None,
                 timeout=240, what="the reason stage to write shards")
        assert proc.poll() is None, f"the run ended before the kill:\n{log_path.read_text()[-5000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (tmp_path / "published" / "data").exists()
    assert (tmp_path / "store" / ".lock").exists()  # left behind by the killed run: stale
    resumed = run_in_process(tmp_path, extra)
    assert resumed["seeds"]["skipped"] == 20  # continued, did not start over
    assert sum(r["skipped"] for r in resumed["stages"]["describe"]) > 0
    ids = published_ids(tmp_path / "published")
    assert sorted(ids) == sorted(reference_ids)
    for stage in ("seeds", "describe", "reason", "anchor", "verify", "vas"):
        rows = stage_row_ids(tmp_path / "store", stage)
        dupes = [i for i, n in Counter(rows).items() if n > 1]
        assert not dupes, f"{stage}: ids written twice after resume: {dupes[:3]}"


def test_a_run_where_nothing_survives_exits_3_and_shows_why(tmp_path):
    """Everything rejected (here: a length bound no response meets): the run finishes, exits 3
    (documented in flows/synth.py), publishes no dataset, and the card and run_summary.json
    carry the funnel with the reject reasons."""
    root = tmp_path / "run"
    proc = subprocess.run(cli_args(run_overrides(root) + ["seeds.n=6", "run.n_shards=2",
                                                          "filter.min_response_length=100000"]),
                          cwd=REPO, env=flow_env(tmp_path / "prefect"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "nothing published: no sample survived" in proc.stdout
    summary = last_summary(root / "store")
    assert summary["funnel"]["steps"].get("unique", 0) == 0 and summary["funnel"]["rejects"]["too_short"] == 6
    assert summary["published"]["splits"] in ({}, None, [])
    assert not list((root / "published").glob("data/*.parquet"))
    card = (root / "cards").rglob("README.md")
    text = "\n".join(p.read_text() for p in card)
    assert "No sample survived this run" in text and "too_short" in text
