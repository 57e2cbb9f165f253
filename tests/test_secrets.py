"""Secrets (HF_TOKEN, OPENAI_API_KEY, a teacher key under a custom variable) never leak.

Sentinel values are put in the environment; the small flow runs with its teacher stages on the
OpenAI backend against the test server (which checks that the key arrived as a bearer token and
never echoes it). Then every byte written under the work store (parquet shards, request cache,
funnel, run summary), the published folder, the card folder, the Prefect home (its SQLite
database holds the logs, task parameters and artifacts) and the captured stdout/stderr is
searched for the sentinels. Teacher errors (401 fatal, 5xx rejects, unreachable server) are
checked with their whole exception chain. A config file holding a key is refused, pointing at
``api_key_env``, without echoing the value and before any work starts.
"""

from __future__ import annotations

import subprocess
import traceback
from pathlib import Path

import pytest
import yaml

from pipeline.records import Reject
from pipeline.seeds import SeedsConfig, iter_seeds
from pipeline.synthesis.stages import DescribeStage, StageConfig
from pipeline.synthesis.teachers.base import TeacherConfig
from pipeline.synthesis.teachers.openai_backend import TeacherFatalError
from tests.support.reliability import (
    CI_CONFIG,
    REPO,
    AuthCheckingServer,
    flow_command,
    flow_env,
    free_port,
    openai_overrides,
    output_overrides,
    published_rows,
    seed_records,
)
from tests.support.teacher_server import ResponderError

SENTINELS = {
    "HF_TOKEN": "hf_SENTINELhfTokenValue0123456789abcdef",
    "OPENAI_API_KEY": "sk-SENTINELopenaiKeyValue0123456789abcd",
    "AVAR_TEST_TEACHER_KEY": "SENTINEL-custom-teacher-key-0123456789",
}


def leaks(text: str | bytes, where: str) -> list[str]:
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    return [f"{where}: ${name}" for name, value in SENTINELS.items() if value.encode() in data]


def scan_tree(root: Path) -> tuple[list[str], int]:
    """(leaks found, number of files scanned) over every file under ``root``."""
    found, scanned = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        found += leaks(path.read_bytes(), str(path.relative_to(root.parent)))
        scanned += 1
    return found, scanned


@pytest.fixture
def secret_env(monkeypatch):
    for name, value in SENTINELS.items():
        monkeypatch.setenv(name, value)
    return dict(SENTINELS)


# --------------------------------------------------------------------------- config files

@pytest.mark.parametrize("where", [["stages", "reason", "teacher", "api_key"],
                                   ["publish", "token"], ["stages", "anchor", "teacher", "sampling", "api_key"]])
def test_config_file_with_a_secret_is_refused_before_any_work(tmp_path, capsys, where):
    from flows.synth import main
    data = yaml.safe_load(CI_CONFIG.read_text())
    data["run"]["store_dir"] = str(tmp_path / "store")
    node = data
    for key in where[:-1]:
        node = node.setdefault(key, {})
    node[where[-1]] = SENTINELS["OPENAI_API_KEY"]
    config = tmp_path / "leaky.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{'.'.join(where)}: secrets never go in a config file" in err
    assert "api_key_env" in err and "HF_TOKEN" in err
    assert not leaks(err, "stderr"), "the refusal echoed the secret"
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- teacher errors

def _describe(server_url: str, store: Path, **teacher) -> object:
    settings = {"backend": "openai", "model": "describer-test", "base_url": server_url,
                "api_key_env": "AVAR_TEST_TEACHER_KEY", "max_retries": 1, "timeout_s": 5.0,
                "backoff_base_s": 0.001, "backoff_max_s": 0.002}
    return DescribeStage(StageConfig(teacher=TeacherConfig(**{**settings, **teacher})),
                       cache=store / "requests.sqlite", progress=False)


def _chain_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(err)) + repr(err) + repr(getattr(err, "__dict__", {}))


def test_teacher_errors_and_rejects_never_carry_the_key(tmp_path, secret_env, caplog):
    seeds = list(iter_seeds(SeedsConfig(n=3, image_size=320)))
    caplog.set_level("DEBUG")

    def unauthorized(call):
        raise ResponderError(401, "invalid api key")

    def broken(call):
        raise ResponderError(500, "backend exploded")

    # 401: fatal for the whole run, raised out of the stage
    with AuthCheckingServer(unauthorized, expected_key=SENTINELS["AVAR_TEST_TEACHER_KEY"]) as server:
        server.register(seeds)
        with _describe(server.base_url, tmp_path) as stage, pytest.raises(TeacherFatalError) as fatal:
            stage.run(seeds)
        assert server.auth_ok >= 1 and server.auth_bad == 0  # the key really was sent
    assert "AVAR_TEST_TEACHER_KEY" in str(fatal.value)  # names the variable, not its value
    assert not leaks(_chain_text(fatal.value), "401 exception")

    # 5xx after retries: every sample a reject whose message carries no key
    with AuthCheckingServer(broken, expected_key=SENTINELS["AVAR_TEST_TEACHER_KEY"]) as server:
        server.register(seeds)
        with _describe(server.base_url, tmp_path) as stage:
            out = stage.run(seeds)
    assert all(isinstance(r, Reject) and r.reason == "teacher_failed" for r in out)
    assert not leaks(repr([r.to_dict() for r in out]), "5xx rejects")

    # nothing listens on the port: connection errors end as rejects, without the key
    with _describe(f"http://127.0.0.1:{free_port()}/v1", tmp_path) as stage:
        out = stage.run(seeds)
    assert all(isinstance(r, Reject) for r in out)
    assert not leaks(repr([r.to_dict() for r in out]), "connection-error rejects")
    assert not leaks("\n".join(r.getMessage() for r in caplog.records), "log records")
    found, scanned = scan_tree(tmp_path)
    assert scanned and not found, found


# --------------------------------------------------------------------------- the whole flow

@pytest.mark.slow
def test_flow_outputs_logs_and_prefect_records_never_contain_secrets(tmp_path):
    root, prefect_home = tmp_path / "run", tmp_path / "prefect_home"
    expected = SENTINELS["AVAR_TEST_TEACHER_KEY"]
    with AuthCheckingServer(expected_key=expected) as server:
        overrides = ["seeds.image_size=320"] + output_overrides(root) + openai_overrides(
            server.base_url, api_key_env="AVAR_TEST_TEACHER_KEY")
        server.register(seed_records(overrides))
        env = flow_env(prefect_home, extra=SENTINELS)  # ephemeral Prefect: its DB under prefect_home
        proc = subprocess.run(flow_command(overrides), check=False, cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert server.auth_ok > 0 and server.auth_bad == 0, "the teacher key was not sent as a bearer token"
        assert sum(server.success_counts.values()) == server.auth_ok
    assert published_rows(root / "published"), "nothing was published"

    found = leaks(proc.stdout, "stdout") + leaks(proc.stderr, "stderr")
    counts = {}
    for folder in (root / "store", root / "published", root / "cards", prefect_home):
        assert folder.is_dir(), folder
        leaked, counts[folder.name] = scan_tree(folder)
        found += leaked
    assert not found, f"secrets found in: {found}"
    assert (root / "store" / "requests.sqlite").exists() and counts["prefect_home"] > 0
    # positive control: the scan does see what the run recorded in Prefect (task parameters
    # hold the overrides, so the teacher URL must be found where a leaked key would be)
    prefect_bytes = b"".join(p.read_bytes() for p in prefect_home.rglob("*") if p.is_file())
    assert server.base_url.encode() in prefect_bytes, "the Prefect database was not scanned"
