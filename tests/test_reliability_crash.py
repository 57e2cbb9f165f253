"""kill -9 of the synthesis flow at points in different stages, restart each time: same dataset.

The small config (configs/ci_small.yaml) runs with its three teacher stages on the OpenAI backend
against the fault-injecting test server (retryable faults only: 5xx, 429, malformed bodies, so
that every request ends in a success and the two runs are comparable). One uninterrupted
reference run, then one run killed with SIGKILL

1. in the middle of the reason stage, at a moment when every answered request is committed to
   the request cache and the next ones are held by the server,
2. while the VAS stage is writing shards,
3. while publish is writing its staging folder,

and restarted after each kill until it completes. The published rows must equal the reference
rows, no store stage may hold an id twice, and the server's counter must show that no successful
request was sent twice. bench/crash.py runs the long version (demo-sized, >= 10 kill points).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.support.reliability import (
    MODELS,
    REPO,
    RETRYABLE_FAULTS,
    STORE_STAGES,
    HoldingResponder,
    PrefectServer,
    committed_requests,
    flow_command,
    flow_env,
    kill_9,
    openai_overrides,
    output_overrides,
    published_rows,
    quiesce_teacher,
    seed_records,
    spawn_flow,
    stage_ids,
    wait_until,
)
from tests.support.teacher_server import TeacherServer

pytestmark = pytest.mark.slow
FAULT_SEED = 11


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """One Prefect server for the module's runs (saves a temporary server start per run)."""
    with PrefectServer(tmp_path_factory.mktemp("prefect")) as server:
        yield server.api_url


def run_to_completion(overrides: list[str], env: dict, log) -> None:
    proc = subprocess.run(flow_command(overrides), check=False, cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT, timeout=400)
    assert proc.returncode == 0, f"flow failed (rc {proc.returncode}), see {log.name}"


def assert_same_rows(reference: dict[str, dict], rows: dict[str, dict]) -> None:
    assert sorted(rows) == sorted(reference), "kept sample ids differ from the uninterrupted run"
    for sample_id, row in rows.items():
        expected = reference[sample_id]
        differing = sorted(k for k in expected if row.get(k) != expected[k])
        assert not differing, f"{sample_id}: fields {differing} differ from the uninterrupted run"


def assert_store_clean(store) -> None:
    for stage in STORE_STAGES:
        ids = stage_ids(store, stage)
        assert ids, f"{stage}: no rows"
        assert len(ids) == len(set(ids)), f"{stage}: an id was written twice after a restart"
    assert not (store / ".lock").exists(), "the finished run left its store lock behind"


def test_kill_9_in_reason_vas_and_publish_then_restart_gives_the_uninterrupted_dataset(prefect_api, tmp_path):
    env = flow_env(tmp_path / "prefect_home", prefect_api)
    common = ["seeds.image_size=320"]  # as in configs/ci_small.yaml (kept explicit: images are registered)
    seeds = seed_records(common)
    n = len(seeds)
    assert n >= 10

    # ---- the uninterrupted reference run
    ref_root = tmp_path / "reference"
    with TeacherServer(HoldingResponder(), fault_rates=RETRYABLE_FAULTS, seed=FAULT_SEED) as server, \
            open(tmp_path / "reference.log", "w") as log:
        server.register(seeds)
        run_to_completion(common + output_overrides(ref_root) + openai_overrides(server.base_url), env, log)
        assert not server.duplicates()
        assert sum(server.success_counts.values()) == 3 * n
        assert set(server.outcomes) - {"ok"}, "the fault mix injected no fault"
    reference = published_rows(ref_root / "published")
    assert len(reference) >= 5
    assert {t["model"] for t in next(iter(reference.values()))["teachers"]} == set(MODELS.values())

    # ---- the same config, killed three times
    root = tmp_path / "crashed"
    store, published = root / "store", root / "published"
    responder = HoldingResponder()
    log_path = tmp_path / "crashed.log"
    killed_at: list[str] = []
    with TeacherServer(responder, fault_rates=RETRYABLE_FAULTS, seed=FAULT_SEED) as server:
        server.register(seeds)
        overrides = common + output_overrides(root) + openai_overrides(server.base_url)
        cache = store / "requests.sqlite"

        # 1. reason stage: describe complete, part of reason answered and committed
        child = spawn_flow(overrides, env, log_path)
        wait_until(lambda: committed_requests(cache) >= n + n // 3, 300, "reason to be under way",
                   alive=child)
        committed = quiesce_teacher(server, responder, cache, child)
        kill_9(child)
        responder.fail_held()
        assert n < committed < 3 * n, committed
        killed_at.append(f"reason ({committed} of {3 * n} requests committed)")
        assert not (store / "vas").exists() or not list((store / "vas").rglob("part-*"))

        # 2. VAS stage: at least one VAS shard written, publish not started
        child = spawn_flow(overrides, env, log_path)
        wait_until(lambda: any((store / "vas").rglob("part-*.parquet")), 300, "a VAS shard", alive=child)
        kill_9(child)
        assert not (published / "data").exists()
        killed_at.append("vas")

        # 3. publish: its staging folder exists
        child = spawn_flow(overrides, env, log_path)
        wait_until(lambda: any(published.glob(".staging-*")), 300, "publish to start", interval=0.005,
                   alive=child)
        kill_9(child)
        killed_at.append("publish")

        with open(log_path, "a") as log:
            run_to_completion(overrides, env, log)
        assert not server.duplicates(), f"successful requests sent twice: {server.duplicates()}"
        assert sum(server.success_counts.values()) == 3 * n
    assert_same_rows(reference, published_rows(published))
    assert_store_clean(store)
    assert (root / "cards" / "avar-ci-small" / "README.md").exists()
    # A kill during publish leaves its staging folder (.staging-<dead pid>) behind; the dataset
    # still loads exactly the published rows (the card lists the data files; pushes skip dot-files).
    import datasets
    loaded = datasets.load_dataset(str(published))
    assert sum(len(split) for split in loaded.values()) == len(reference)
