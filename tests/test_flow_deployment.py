"""THE deployment test: a real Prefect server on 127.0.0.1 (own SQLite under a temp PREFECT_HOME),
``python -m flows.deploy`` serving synth/avar, ``prefect deployment run synth/avar`` on the small
config, then the published folder, the flow-run state and the run artifact checked through the
server's REST API; and the same run watched in the Prefect UI in headless Chromium, during the
run and after it. Everything started here is stopped with SIGTERM by pid in ``finally``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.flows import (
    CI_CONFIG,
    CI_DATASET,
    PYTHON,
    REPO,
    flow_env,
    free_port,
    last_summary,
    published_ids,
    run_overrides,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.slow
PREFECT = str(Path(PYTHON).parent / "prefect")


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server for this module: (api_url, env for clients of it, log path)."""
    home = tmp_path_factory.mktemp("prefect_server")
    api_url = f"http://127.0.0.1:{free_port()}/api"
    env = flow_env(home / "home", api_url)
    env["PREFECT_UI_API_URL"] = api_url  # the UI in a browser asks this server, not :4200
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed in finally
    port = api_url.rsplit(":", 1)[1].split("/")[0]
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port],
                              cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _healthy(api_url) or server.poll() is not None, timeout=90, what="prefect server")
        assert server.poll() is None, (home / "server.log").read_text()[-3000:]
        assert (home / "home").is_dir()  # its own PREFECT_HOME (SQLite database inside)
        yield api_url, env, home
    finally:
        stop_process(server)
        log.close()


def _deployment_ready(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/deployments/name/synth/avar", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_deployment_run_publishes(prefect_server, tmp_path):
    api_url, env, home = prefect_server
    serve_log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    serve = subprocess.Popen([PYTHON, "-m", "flows.deploy", "--config", str(CI_CONFIG)], cwd=REPO,
                             env=env, stdout=serve_log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _deployment_ready(api_url) or serve.poll() is not None, timeout=90,
                 what="deployment synth/avar")
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        overrides = json.dumps(run_overrides(tmp_path) + ["seeds.n=8"])  # small: the server is the point
        run = subprocess.run([PREFECT, "deployment", "run", "synth/avar", "--param",
                              f"config_path={CI_CONFIG}", "--param", f"overrides={overrides}",
                              "--watch", "--watch-timeout", "300"],
                             cwd=home, env=env, capture_output=True, text=True, timeout=330,
                             check=False)
        detail = f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{(tmp_path / 'serve.log').read_text()[-6000:]}"
        assert run.returncode == 0, detail

        deployment = httpx.get(f"{api_url}/deployments/name/synth/avar", timeout=10).json()
        runs = httpx.post(f"{api_url}/flow_runs/filter", timeout=10, json={
            "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}).json()
        assert [r["state"]["type"] for r in runs] == ["COMPLETED"], detail
        assert runs[0]["parameters"]["config_path"] == str(CI_CONFIG)

        ids = published_ids(tmp_path / "published")
        assert ids and len(ids) == len(set(ids))
        assert last_summary(tmp_path / "store")["funnel"]["steps"]["unique"] == len(ids)
        assert (tmp_path / "cards" / CI_DATASET / "README.md").exists()

        artifacts = httpx.post(f"{api_url}/artifacts/filter", timeout=10, json={
            "artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}}}).json()
        markdown = [a for a in artifacts if a["key"] == "avar-synth-run"]
        assert markdown and "## Funnel" in markdown[0]["data"] and "reject" in markdown[0]["data"]
        assert str(tmp_path / "published") in markdown[0]["data"]
    finally:
        stop_process(serve)
        serve_log.close()


SCREENSHOTS = REPO / "outputs" / "test-screenshots"  # test outputs (docs/ holds the committed ones)


def _latest_artifact(api_url: str, key: str, flow_run_id: str) -> dict | None:
    found = httpx.post(f"{api_url}/artifacts/filter", timeout=10, json={
        "artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [flow_run_id]}},
        "sort": "CREATED_DESC", "limit": 1}).json()
    if not found:
        return None
    data = found[0]["data"]  # a table artifact's rows arrive as a JSON string
    return {**found[0], "data": json.loads(data) if isinstance(data, str) and found[0]["type"] == "table" else data}


def test_a_run_watched_in_the_browser(prefect_server, tmp_path):
    """The UI shows the run's progress while it runs (the anchor teacher is held back) and, once
    it finished, readable funnel counts, reject reasons and the cost column."""
    import asyncio
    import threading

    from tests.support.browser import page_text, screenshot
    from tests.support.reliability import gold_responder, openai_overrides, seed_records
    from tests.support.teacher_server import TeacherServer

    api_url, env, home = prefect_server
    ui = api_url.removesuffix("/api")
    release = threading.Event()
    wrong: set[str] = set()

    async def responder(call):
        while call.stage == "anchor" and not release.is_set():
            await asyncio.sleep(0.05)
        if call.stage == "reason" and call.record["id"] in wrong:  # two rejects with a reason, by design
            return "<think>Read the values. Wait, check again. It is 12345.</think><answer>12345</answer>"
        return gold_responder(call)

    overrides = run_overrides(tmp_path) + ["seeds.n=8", "run.progress=false"]
    seeds = seed_records(overrides)
    wrong.update(s["id"] for s in seeds[:2])
    serve_log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    serve = subprocess.Popen([PYTHON, "-m", "flows.deploy", "--config", str(CI_CONFIG)], cwd=REPO,
                             env=env, stdout=serve_log, stderr=subprocess.STDOUT)
    with TeacherServer(responder) as teacher:
        teacher.register(seeds)
        priced = [f"stages.{s}.teacher.price_{k}_per_mtok=2.5" for s in ("describe", "reason", "anchor")
                  for k in ("input", "output")]
        params = json.dumps(overrides + openai_overrides(teacher.base_url) + priced)
        try:
            wait_for(lambda: _deployment_ready(api_url) or serve.poll() is not None, timeout=90,
                     what="deployment synth/avar")
            run = subprocess.run([PREFECT, "deployment", "run", "synth/avar", "--param",
                                  f"config_path={CI_CONFIG}", "--param", f"overrides={params}"],
                                 cwd=home, env=env, capture_output=True, text=True, timeout=60, check=True)
            assert "Created flow run" in run.stdout, run.stdout
            flow_run = {}

            def reason_done() -> bool:
                runs = httpx.post(f"{api_url}/flow_runs/filter", timeout=10, json={}).json()
                mine = [r for r in runs if r["parameters"].get("overrides") == json.loads(params)]
                if mine:
                    flow_run.update(mine[0])
                    live = _latest_artifact(api_url, "avar-live", mine[0]["id"])
                    return bool(live) and any(row["Stage"] == "reason" and row["Shards"] == "2/2"
                                              for row in live["data"])
                return False

            wait_for(reason_done, timeout=240, what="reason finished, anchor held")
            live = _latest_artifact(api_url, "avar-live", flow_run["id"])
            running = page_text(f"{ui}/artifacts/artifact/{live['id']}")
            assert "Live:" in running and "Cost (USD)" in running and "Tokens in / out" in running
            assert "anchor_answer_changed" not in running  # anchor is held
            assert "0/2" in running  # anchor (and after it) not finished yet
            screenshot(f"{ui}/artifacts/artifact/{live['id']}", SCREENSHOTS / "run-in-progress-live-table.png")
            page = page_text(f"{ui}/runs/flow-run/{flow_run['id']}")
            assert "Running" in page and flow_run["name"] in page
            screenshot(f"{ui}/runs/flow-run/{flow_run['id']}", SCREENSHOTS / "run-in-progress.png")

            release.set()
            wait_for(lambda: httpx.get(f"{api_url}/flow_runs/{flow_run['id']}", timeout=10)
                     .json()["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED"), timeout=300,
                     what="the run to finish")
            assert httpx.get(f"{api_url}/flow_runs/{flow_run['id']}", timeout=10).json()["state"]["type"] == "COMPLETED"
        finally:
            stop_process(serve)
            serve_log.close()
    summary = last_summary(tmp_path / "store")
    kept = summary["funnel"]["steps"]["unique"]
    report = _latest_artifact(api_url, "avar-synth-run", flow_run["id"])
    finished = page_text(f"{ui}/artifacts/artifact/{report['id']}")
    assert f"Kept : {kept} samples" in finished
    assert f"Not a duplicate: kept {kept}" in finished  # the funnel's last row, with its count
    assert "anchor_answer_changed (2)" in finished  # the reject reasons, per stage
    assert "Est. cost (USD)" in finished and "{'" not in finished  # the cost column; no raw dict
    cost = sum(r["usage"]["cost_usd"] for reports in summary["stages"].values() for r in reports if r.get("usage"))
    assert cost > 0 and f"{sum(r['usage']['cost_usd'] for r in summary['stages']['reason']):.4f}" in finished
    screenshot(f"{ui}/artifacts/artifact/{report['id']}", SCREENSHOTS / "run-finished-summary.png")
    screenshot(f"{ui}/runs/flow-run/{flow_run['id']}", SCREENSHOTS / "run-finished.png")
