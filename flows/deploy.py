"""Serve the ``synth`` flow as the deployment ``synth/avar`` (a long-running process).

Needs a Prefect API (``PREFECT_API_URL``, e.g. a local server started by
scripts/prefect_local.sh). Then, from any shell pointing at the same API::

    prefect deployment run synth/avar --param config_path=configs/demo.yaml \
        --param overrides='["seeds.n=2000"]' --watch

Flow runs execute in subprocesses of this process, in its working directory (run it from the
repository root so relative config paths and ``flows.synth`` resolve). Stop it with SIGTERM or
Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from prefect.types.entrypoint import EntrypointType

from flows.synth import synth

DEPLOYMENT = "avar"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--name", default=DEPLOYMENT, help="deployment name (default: avar)")
    parser.add_argument("--config", default="configs/demo.yaml",
                        help="default config_path of runs that do not pass one")
    parser.add_argument("--limit", type=int, default=1,
                        help="flow runs this process executes at once (runs on one store serialise "
                             "on its lock anyway)")
    args = parser.parse_args(argv)
    from prefect.settings import PREFECT_API_URL
    if not PREFECT_API_URL.value():  # serving against a temporary server would lose every run
        print("PREFECT_API_URL is not set: start a server first (scripts/prefect_local.sh, or "
              "`prefect server start --host 127.0.0.1` and export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api)", file=sys.stderr)
        return 2
    # MODULE_PATH: runs import ``flows.synth`` by module name, so its package imports resolve.
    synth.serve(name=args.name, parameters={"config_path": args.config, "overrides": []},
                limit=args.limit, entrypoint_type=EntrypointType.MODULE_PATH,
                description="AVAR synthesis: seeds -> teachers -> verify -> VAS -> filter -> publish",
                tags=["avar"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
