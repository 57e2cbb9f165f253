"""THE deployment test: a real Prefect server on 127.0.0.1 (own SQLite under a temp PREFECT_HOME),
``python -m flows.deploy`` serving synth/avar, ``prefect deployment run synth/avar`` on the small
config, then the published folder, the flow-run state and the run artifact checked through the
server's REST API. Everything started here is stopped with SIGTERM by pid in ``finally``.
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
