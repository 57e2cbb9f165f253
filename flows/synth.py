"""Prefect flow ``synth``: seeds -> describe -> reason -> anchor -> verify -> VAS -> filter -> publish.

Run locally (ephemeral Prefect, no server needed)::

    python -m flows.synth --config configs/demo.yaml [--set run.n_shards=8 --set seeds.n=2000]

or as the deployment ``synth/avar`` (see flows/deploy.py and scripts/prefect_local.sh).

Orchestration only: each task calls one function of :mod:`flows.components`, which calls the
pipeline. Seed ids are split into ``run.n_shards`` partitions; every per-shard stage is mapped
over them, shard k of a stage waiting only for shard k of the stage before, so stages overlap.
Every task writes through ``pipeline.executor.run_stage`` into the work store, which skips ids
already done: a retried task, or the whole flow re-run after a crash, continues where it
stopped. The store lock is held for the whole run (a second run on the same store refuses).

On Ray (``--set run.runner=ray``, the ``ray`` extra): without an address a local Ray starts
and stops with the run; for a cluster (``ray start --head`` then ``ray start
--address=HEAD:6379`` on the workers) set ``RAY_ADDRESS=auto`` (or ``run.ray_address``,
``ray://HEAD:10001`` from outside). The work store, request cache and publish folder must then
be on a file system every node sees, and every node needs this project installed
(``pip install -e '.[ray]'``). ``run.ray_remote_options`` gives per-stage resources, e.g.
``{vas: {num_gpus: 1}}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from flows import components
from flows.config import RunConfig, SynthConfig, load_synth_config
from flows.report import run_summary_markdown
from pipeline.atomic import write_json_atomic
from pipeline.configio import ConfigError, config_help
from pipeline.plan import DEFAULT_PLAN
from pipeline.store import WorkStore

# Configuration mistakes (bad key, wrong URL, unknown model) fail the same way every time.
_NOT_RETRYABLE = ("ConfigError", "TeacherFatalError", "FileNotFoundError")


def _retryable(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - classifying the task's own failure
        return type(err).__name__ not in _NOT_RETRYABLE
    return True


_TASK_DEFAULTS = {"cache_policy": NO_CACHE, "persist_result": False, "log_prints": True,
                  "retry_condition_fn": _retryable}


def _bar(config: SynthConfig, total: int | None, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="rec", mininterval=1.0, leave=False,
                disable=not config.run.progress, file=sys.stderr)


@task(name="seeds", **_TASK_DEFAULTS)
def seeds_task(config: SynthConfig) -> dict:
    with _bar(config, config.seeds.n, "seeds") as bar:
        report = components.run_seeds(config, progress=bar.update)
    get_run_logger().info("seeds: %d new records, %d rejects, %d already in the store",
                          report["results"], report["rejects"], report["skipped"])
    return report


@task(name="stage", **_TASK_DEFAULTS)
def shard_task(stage: str, shard: int, config: SynthConfig, upstream: dict | None = None) -> dict:
    # ``upstream`` (shard k of the previous stage) only orders the tasks.
    with _bar(config, None, f"{stage}[{shard}]") as bar:
        report = components.run_shard(stage, shard, config, progress=bar.update)
    get_run_logger().info("%s shard %d: %d results, %d rejects, %d skipped (done before) in %.1fs",
                          stage, shard, report["results"], report["rejects"], report["skipped"],
                          report["finished"] - report["started"])
    return {**report, "shard": shard}


@task(name="filter", **_TASK_DEFAULTS)
def filter_task(config: SynthConfig) -> dict:
    out = components.run_filter(config)
    get_run_logger().info("filter: funnel %s", out["funnel"])
    return out


@task(name="publish", **_TASK_DEFAULTS)
def publish_task(config: SynthConfig, filtered: dict) -> dict:
    out = components.run_publish(config, filtered["funnel"])
    get_run_logger().info("published to %s", out.get("out_dir"))
    return out


def build_task_runner(run: RunConfig):
    """ThreadPoolTaskRunner or prefect-ray's RayTaskRunner (``run.runner``)."""
    if run.runner == "thread":
        return ThreadPoolTaskRunner(max_workers=run.max_workers)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as err:
        raise ConfigError("run.runner: 'ray' needs the ray extra: pip install -e '.[ray]'") from err
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    init_kwargs: dict = {}
    if not address:  # a local Ray: its workers must import this checkout
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
        init_kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        if run.ray_num_cpus:
            init_kwargs["num_cpus"] = run.ray_num_cpus
        init_kwargs["include_dashboard"] = False
    return RayTaskRunner(address=address, init_kwargs=init_kwargs)


def _ray_options(run: RunConfig, stage: str):
    if run.runner == "ray" and run.ray_remote_options.get(stage):
        from prefect_ray.context import remote_options
        return remote_options(**run.ray_remote_options[stage])
    from contextlib import nullcontext
    return nullcontext()


@flow(name="synth", log_prints=True)
def synth(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict:
    """Synthesize, score, filter and publish a dataset as configured in ``config_path``."""
    logger = get_run_logger()
    config = load_synth_config(config_path, overrides or [])  # validated before any work
    logger.info("config %s (digest %s), store %s, runner %s, %d shards", config_path,
                config.digest()[:12], config.run.store_dir, config.run.runner, config.run.n_shards)
    started = time.time()
    store = WorkStore(config.run.store_dir)
    with store.locked():
        retry = {"retries": config.run.task_retries, "retry_delay_seconds": config.run.retry_delay_s}
        with build_task_runner(config.run) as runner, components.STAGE_POOL:
            seeds = runner.submit(seeds_task.with_options(**retry), {"config": config}).result()
            shards = list(range(config.run.n_shards))
            previous: list = [None] * len(shards)
            per_stage: dict[str, list] = {}
            for stage in (s.name for s in DEFAULT_PLAN.of_scope("shard")):
                task_for_stage = shard_task.with_options(
                    name=stage, task_run_name=f"{stage}-shard{{shard}}", tags=[f"avar-{stage}"], **retry)
                with _ray_options(config.run, stage):
                    previous = runner.map(task_for_stage, {
                        "stage": unmapped(stage), "shard": shards,
                        "config": unmapped(config), "upstream": previous})
                per_stage[stage] = previous
            reports = {stage: [f.result() for f in futures] for stage, futures in per_stage.items()}
            filtered = runner.submit(filter_task.with_options(**retry), {"config": config}).result()
            published = runner.submit(publish_task.with_options(**retry),
                                      {"config": config, "filtered": filtered}).result()
    summary = {"config_path": config_path, "config_digest": config.digest(),
               "store_dir": str(config.run.store_dir), "seconds": time.time() - started,
               "runner": config.run.runner, "flow_pid": os.getpid(),
               "seeds": seeds, "stages": reports,
               "funnel": filtered["funnel"], "published": published}
    write_json_atomic(store.root / "run_summary.json", summary)
    create_markdown_artifact(key="avar-synth-run", markdown=run_summary_markdown(summary, store),
                             description=f"AVAR synthesis run on {config_path}")
    logger.info("done in %.1fs: %s", summary["seconds"], published.get("out_dir"))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.synth", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.n_shards=8 (repeatable)")
    parser.add_argument("--check", action="store_true", help="validate the config, print it, and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its help")
    args = parser.parse_args(argv)
    if args.help_config:
        for key, type_name, text in config_help(SynthConfig):
            print(f"{key} ({type_name}): {text}")
        return 0
    try:  # fail fast, before Prefect starts a temporary server
        config = load_synth_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.check:
        import yaml

        from pipeline.configio import to_dict
        print(yaml.safe_dump(to_dict(config), sort_keys=False))
        print(f"# digest {config.digest()}")
        return 0
    summary = synth(config_path=args.config, overrides=args.overrides)
    print(f"published: {summary['published'].get('out_dir')}  card: {summary['published'].get('card_path')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
