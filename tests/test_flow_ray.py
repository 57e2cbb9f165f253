"""The same flow, unchanged, on Ray (prefect-ray's RayTaskRunner) via ``run.runner=ray``.

The flow process starts a local Ray with 2 CPUs (ray.init through the task runner) and shuts it
down at the end; tasks run in Ray worker processes, which the per-task pids prove.
"""

from __future__ import annotations

import pytest

from tests.support.flows import flow_env, last_summary, published_ids, run_cli, run_overrides

pytestmark = pytest.mark.slow

try:
    import prefect_ray  # noqa: F401
    import ray  # noqa: F401
except ImportError as err:  # the `ray` extra is optional
    pytest.skip(f"ray extra not installed ({err}); pip install -e '.[ray]'", allow_module_level=True)


def test_flow_on_local_ray(tmp_path):
    env = flow_env(tmp_path / "prefect")
    env["RAY_TMPDIR"] = "/tmp"  # Ray's socket paths must stay short
    overrides = run_overrides(tmp_path) + ["run.runner=ray", "run.ray_num_cpus=2", "run.n_shards=2",
                                          "seeds.n=8"]
    run_cli(overrides, env, timeout=400)
    summary = last_summary(tmp_path / "store")
    assert summary["runner"] == "ray"
    task_pids = {r["pid"] for reports in summary["stages"].values() for r in reports}
    assert summary["flow_pid"] not in task_pids, "stage tasks ran in the flow process, not on Ray"
    ids = published_ids(tmp_path / "published")
    assert ids and len(ids) == len(set(ids))
    assert summary["funnel"]["steps"]["unique"] == len(ids)
