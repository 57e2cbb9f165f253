"""The synth flow with its three teachers in ``mode: batch`` (``python -m flows.synth``), against the
test server's Batch API: the projected cost of ``--check``, ``--no-wait`` (exit code 4), the
batch list, and a re-run that collects and publishes, paying each request once at half price."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from pipeline.synthesis.batch.state import BatchState
from tests.support.reliability import (
    REPO,
    TEACHER_STAGES,
    flow_command,
    flow_env,
    openai_overrides,
    output_overrides,
    published_rows,
    seed_records,
)
from tests.support.teacher_server import TeacherServer

pytestmark = pytest.mark.slow
PRICES = {"price_input_per_mtok": 2.0, "price_output_per_mtok": 8.0}


def batch_overrides() -> list[str]:
    out = []
    for stage in TEACHER_STAGES:
        prefix = f"stages.{stage}.teacher"
        out += [f"{prefix}.mode=batch", f"{prefix}.batch.poll_initial_s=0.01", f"{prefix}.batch.poll_max_s=0.05"]
        out += [f"{prefix}.{key}={value}" for key, value in PRICES.items()]
    return out


def run(overrides: list[str], env: dict, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(flow_command(overrides) + list(flags), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400, check=False)


def test_check_projects_the_cost_online_and_at_the_batch_discount(tmp_path):
    overrides = output_overrides(tmp_path) + openai_overrides("http://127.0.0.1:9/v1") + batch_overrides()
    proc = run(overrides, flow_env(tmp_path / "prefect"), "--check")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (describe|reason|anchor) \| openai \S+ \| batch \| ([\d,]+) \| ([\d,]+) \| "
                      r"([\d,]+) \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ["describe", "reason", "anchor"]
    for _, requests, prompt, completion, online, batch in rows:
        assert int(requests) == 20 and int(prompt.replace(",", "")) > 0  # seeds.n of ci_small.yaml
        prompt, completion = int(prompt.replace(",", "")), int(completion.replace(",", ""))
        assert float(online) == pytest.approx((2.0 * prompt + 8.0 * completion) / 1e6, abs=0.006)
        assert float(batch) == pytest.approx(float(online) / 2, abs=0.006)
    assert not (tmp_path / "store").exists()  # nothing was run


def test_no_wait_exits_4_then_a_rerun_collects_and_publishes_paying_once(tmp_path):
    root = tmp_path / "run"
    overrides = ["seeds.image_size=320"] + output_overrides(root) + openai_overrides(
        "http://127.0.0.1:0/v1") + batch_overrides()
    seeds = seed_records(overrides)
    env = flow_env(tmp_path / "prefect")
    with TeacherServer() as server:
        server.register(seeds)
        overrides = [o.replace("http://127.0.0.1:0/v1", server.base_url) for o in overrides]
        first = run(overrides, env, "--no-wait")
        assert first.returncode == 4, (first.stdout + first.stderr)[-4000:]
        assert "batches still running (describe: 2)" in first.stdout and "re-run" in first.stdout
        assert not (root / "published").exists()
        assert json.loads((root / "store" / "run_summary.json").read_text())["batches_pending"] == {"describe": 2}
        assert len(server.batches.batches) == 2 and not server.success_counts  # one batch per shard

        listed = run(overrides, env, "--batches")
        assert listed.returncode == 0, listed.stderr[-3000:]
        table = [line for line in listed.stdout.splitlines() if line.startswith("| describe |")]
        assert len(table) == 2 and all("batch-00000" in line for line in table)

        server.batches.behaviour.steps_per_read = 4  # the provider is done by the next look
        second = run(overrides, env, "--no-wait")
        assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
        assert not server.duplicates()
        assert sum(server.success_counts.values()) == 3 * len(seeds)  # every request paid once
        assert all(n == 1 for n in server.batches.lines_submitted().values())
        assert len(server.batches.batches) == 6  # 3 stages x 2 shards
    assert published_rows(root / "published")
    jobs = BatchState(root / "store" / "requests.sqlite").jobs()
    assert len(jobs) == 6 and {j.status for j in jobs} == {"collected"}
    summary = json.loads((root / "store" / "run_summary.json").read_text())
    for stage in TEACHER_STAGES:
        usage = [r["usage"] for r in summary["stages"][stage]]
        prompt, completion = sum(u["prompt_tokens"] for u in usage), sum(u["completion_tokens"] for u in usage)
        assert sum(u["requests"] for u in usage) == len(seeds) and prompt > 0
        assert sum(u["cost_usd"] for u in usage) == pytest.approx((2.0 * prompt + 8.0 * completion) / 2e6, rel=1e-3)
