"""Prefect flow ``synth``: seeds -> describe -> reason -> anchor -> verify -> VAS -> filter -> publish.

Run locally (ephemeral Prefect, no server needed)::

    python -m flows.synth --config configs/demo.yaml [--set run.n_shards=8 --set seeds.n=2000]

or as the deployment ``synth/avar`` (see flows/deploy.py and scripts/prefect_local.sh).

Exit codes of ``python -m flows.synth``: 0 published; 2 a configuration or endpoint problem
found before any work (the message names the key), or a managed vLLM server (``teacher.serve``)
that did not start; 1 a stage stopped (e.g. the teacher's
circuit breaker: the same refusal again and again, or a server that went away; or batches
cancelled with ``--cancel-batches``); 3 the run
finished but no sample survived (nothing published; the card and ``run_summary.json`` show
the funnel and the reject reasons); 4 (``--no-wait``) teachers in ``mode: batch`` have batches
still running: nothing was published, and re-running the same command collects what finished
(and exits 4 again until every stage is done).

Batch teachers: ``--batches`` lists the run's batches (stage, shard, batch id, status, requests),
``--cancel-batches`` cancels those still running (their finished lines are kept; a re-run
submits the rest), ``--check`` prints the projected teacher cost before anything is sent.

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
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from flows import components
from flows.config import RunConfig, SynthConfig, load_synth_config
from flows.progress import RunProgress
from flows.report import publish_run_artifacts
from pipeline.atomic import write_json_atomic
from pipeline.configio import ConfigError, config_help
from pipeline.errors import PermanentError, retryable
from pipeline.filtering.funnel import funnel_line
from pipeline.plan import DEFAULT_PLAN
from pipeline.store import WorkStore
from pipeline.synthesis.vllm_server import ServerStartError

EXIT_NOTHING_PUBLISHED = 3  # the run finished, but no sample survived (the card says why)
EXIT_BATCHES_PENDING = 4  # --no-wait: batches still run; re-run the same command to collect


def _retryable(task, task_run, state) -> bool:
    """Prefect retries a task only when the same work may succeed the next time."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - classifying the task's own failure
        return retryable(err)
    return True


_TASK_DEFAULTS = {"cache_policy": NO_CACHE, "persist_result": False, "log_prints": True,
                  "retry_condition_fn": _retryable}


def _bar(config: SynthConfig, total: int | None, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="rec", mininterval=1.0, leave=False,
                disable=not config.run.progress, file=sys.stderr)


@task(name="preflight", **_TASK_DEFAULTS)
def preflight_task(config: SynthConfig) -> list[str]:
    checked = components.preflight(config)
    get_run_logger().info("preflight: %s ready", ", ".join(checked) or "nothing to check")
    return checked


@task(name="seeds", **_TASK_DEFAULTS)
def seeds_task(config: SynthConfig) -> dict:
    with _bar(config, config.seeds.n, "seeds") as bar:
        report = components.run_seeds(config, progress=bar.update)
    get_run_logger().info("seeds: %d new records, %d rejects, %d already in the store",
                          report["results"], report["rejects"], report["skipped"])
    return report


@task(name="stage", **_TASK_DEFAULTS)
def shard_task(stage: str, shard: int, config: SynthConfig, upstream: dict | None = None) -> dict:
    # ``upstream`` (shard k of the previous stage) only orders the tasks. No progress bar here:
    # parallel tasks' bars would overwrite each other; the flow prints one line per shard.
    report = components.run_shard(stage, shard, config)
    if report.get("batch_pending"):
        get_run_logger().info("%s shard %d: %s", stage, shard, report["batch_message"])
        return {**report, "shard": shard}
    get_run_logger().info("%s shard %d: %d results, %d rejects, %d skipped (done before) in %.1fs",
                          stage, shard, report["results"], report["rejects"], report["skipped"],
                          report["finished"] - report["started"])
    return {**report, "shard": shard}


@task(name="filter", **_TASK_DEFAULTS)
def filter_task(config: SynthConfig) -> dict:
    out = components.run_filter(config)
    get_run_logger().info("filter: %s", funnel_line(out["funnel"]))
    return out


@task(name="publish", **_TASK_DEFAULTS)
def publish_task(config: SynthConfig, filtered: dict) -> dict:
    out = components.run_publish(config, filtered["funnel"])
    get_run_logger().info("published to %s", out.get("out_dir"))
    return out


def _gather(per_stage: dict[str, list], progress: RunProgress) -> dict[str, list[dict]]:
    """Every shard report, per stage in shard order; ``progress`` hears of each as it finishes."""
    stage_of = {future.task_run_id: stage for stage, futures in per_stage.items() for future in futures}
    for future in as_completed([f for futures in per_stage.values() for f in futures]):
        progress.update(stage_of[future.task_run_id], future.result())
    return {stage: [f.result() for f in futures] for stage, futures in per_stage.items()}


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
def synth(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
          preflight: bool = True) -> dict:
    """Synthesize, score, filter and publish a dataset as configured in ``config_path``.

    ``preflight`` checks every teacher endpoint (and the VAS model) before any work.
    """
    logger = get_run_logger()
    config = load_synth_config(config_path, overrides or [])  # validated before any work
    logger.info("config %s (digest %s), store %s, runner %s, %d shards", config_path,
                config.digest()[:12], config.run.store_dir, config.run.runner, config.run.n_shards)
    started = time.time()
    store = WorkStore(config.run.store_dir)
    with store.locked(), components.managed_servers(config, store.root / "logs") as config:
        retry = {"retries": config.run.task_retries, "retry_delay_seconds": config.run.retry_delay_s}
        with build_task_runner(config.run) as runner, components.STAGE_POOL:
            if preflight:  # in this process: endpoints unreachable from here fail here
                preflight_task(config)
            seeds = runner.submit(seeds_task.with_options(**retry), {"config": config}).result()
            shards = list(range(config.run.n_shards))
            previous: list = [None] * len(shards)
            per_stage: dict[str, list] = {}
            stage_names = [s.name for s in DEFAULT_PLAN.of_scope("shard")]
            progress = RunProgress(stage_names, config.run.n_shards, logger,
                                   batch_state=components.batch_state_path(config))
            progress.start()
            for stage in stage_names:
                task_for_stage = shard_task.with_options(
                    name=stage, task_run_name=f"{stage}-shard{{shard}}", tags=[f"avar-{stage}"], **retry)
                with _ray_options(config.run, stage):
                    previous = runner.map(task_for_stage, {
                        "stage": unmapped(stage), "shard": shards,
                        "config": unmapped(config), "upstream": previous})
                per_stage[stage] = previous
            try:
                reports = _gather(per_stage, progress)
            finally:
                progress.stop()
            pending = {stage: sum(r.get("batch_pending", 0) for r in rs) for stage, rs in reports.items()}
            pending = {stage: n for stage, n in pending.items() if n}
            if pending:  # --no-wait: nothing downstream is complete; filter and publish later
                logger.warning("batches still running (%s): nothing filtered or published; re-run the "
                               "same command to collect them", ", ".join(f"{s} {n}" for s, n in pending.items()))
                return _pending_summary(config_path, config, store, started, seeds, reports, pending)
            filtered = runner.submit(filter_task.with_options(**retry), {"config": config}).result()
            published = runner.submit(publish_task.with_options(**retry),
                                      {"config": config, "filtered": filtered}).result()
    from pipeline.vlm.loading import has_random_weights  # torch: only once the run has happened
    from pipeline.vlm.reference import reference_summary

    summary = {"config_path": config_path, "config_digest": config.digest(),
               "store_dir": str(config.run.store_dir), "seconds": time.time() - started,
               "runner": config.run.runner, "flow_pid": os.getpid(),
               "seeds": seeds, "stages": reports, "vas_model": config.vas.model,
               "vas_random_weights": has_random_weights(config.vas.model),
               "vas_reference": reference_summary(config.vas.model),
               "vas_system_prompt": config.vas.system_prompt,
               "funnel": filtered["funnel"], "published": published}
    write_json_atomic(store.root / "run_summary.json", summary)
    publish_run_artifacts(summary, store)
    if published.get("splits"):
        logger.info("done in %.1fs: %s", summary["seconds"], published.get("out_dir"))
    else:
        logger.warning("done in %.1fs: no sample survived, nothing was published; the card %s and "
                       "%s show the reject reasons", summary["seconds"], published.get("card_path"),
                       store.root / "run_summary.json")
    return summary


def _pending_summary(config_path: str, config: SynthConfig, store: WorkStore, started: float,
                     seeds: dict, reports: dict, pending: dict[str, int]) -> dict:
    summary = {"config_path": config_path, "config_digest": config.digest(),
               "store_dir": str(config.run.store_dir), "seconds": time.time() - started,
               "runner": config.run.runner, "flow_pid": os.getpid(), "seeds": seeds, "stages": reports,
               "batches_pending": pending}
    write_json_atomic(store.root / "run_summary.json", summary)
    return summary


def _batch_command(args, config: SynthConfig) -> int:
    """``--batches`` / ``--cancel-batches``: a table of the run's batch jobs."""
    from pipeline.synthesis.batch.manage import cancel_batches, list_batches

    teachers = {name: getattr(config.stages, name).teacher for name in components.STAGE_NAMES_WITH_TEACHERS}
    cache = config.run.request_cache_path()
    rows = cancel_batches(cache, teachers) if args.cancel_batches else list_batches(cache, teachers)
    if not rows:
        print(f"no {'running ' if args.cancel_batches else ''}batches in {cache}")
        return 0
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.cancel_batches:
        print(f"cancel requested for {len(rows)} batch job(s); finished lines are kept: re-run the "
              "same command to collect them and submit the rest")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.synth", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.n_shards=8 (repeatable)")
    parser.add_argument("--check", action="store_true", help="validate the config, print it, and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its help")
    parser.add_argument("--no-wait", action="store_true",
                        help=f"teachers in mode batch: submit their batches and exit "
                             f"({EXIT_BATCHES_PENDING} while any still runs); re-run to collect")
    parser.add_argument("--batches", action="store_true", help="list the run's batches and exit")
    parser.add_argument("--cancel-batches", action="store_true",
                        help="cancel the run's running batches (finished lines are kept) and exit")
    args = parser.parse_args(argv)
    if args.no_wait:
        args.overrides.append("run.batch_wait=false")
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
        from pipeline.synthesis.projection import projection_text
        print(yaml.safe_dump(to_dict(config), sort_keys=False))
        print(f"# digest {config.digest()}")
        try:  # the projection reads a few seeds: a seed source it cannot read is no config error
            print(projection_text(config))
        except Exception as err:  # noqa: BLE001 - reported, --check still validated the config
            print(f"# projected teacher cost unavailable: {type(err).__name__}: {err}")
        return 0
    if args.batches or args.cancel_batches:
        return _batch_command(args, config)
    try:
        managed = components.has_managed_servers(config)
        if not managed:  # before Prefect starts: a wrong endpoint costs seconds
            components.preflight(config)
        summary = synth(config_path=args.config, overrides=args.overrides, preflight=managed)
    except (PermanentError, ServerStartError) as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError | ServerStartError) else 1
    finally:
        components.STAGE_POOL.close()
    if summary.get("batches_pending"):
        print(f"batches still running ({', '.join(f'{s}: {n}' for s, n in summary['batches_pending'].items())}); "
              "nothing published yet: re-run the same command to collect them (--batches lists them)")
        return EXIT_BATCHES_PENDING
    published = summary["published"]
    if not published.get("splits"):
        print(f"nothing published: no sample survived (reject reasons in {published.get('card_path')} "
              f"and {summary['store_dir']}/run_summary.json)")
        return EXIT_NOTHING_PUBLISHED
    print(f"published: {published.get('out_dir')}  card: {published.get('card_path')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
