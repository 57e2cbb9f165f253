"""A process that runs the three teacher stages of a config in ``mode: batch`` through the flow's
own shard functions (:mod:`flows.components`, no Prefect), for kill -9 tests.

    python -m tests.support.batch_child OUT.json --set KEY=VALUE ...

Seeds, then every shard of describe, reason and anchor; finally ``OUT.json`` maps each sample id
to its stage texts (or its reject reason). Killed anywhere, run again with the same arguments,
it continues from the work store and the batch state.
"""

from __future__ import annotations

import json
import sys

from flows import components
from flows.config import load_synth_config
from pipeline.store import WorkStore
from tests.support.flows import CI_CONFIG

STAGES = ("describe", "reason", "anchor")


def outputs(store_dir: str) -> dict[str, dict]:
    store, out = WorkStore(store_dir), {}
    for stage in STAGES:
        for record in store.stage(stage).iter_records():
            out.setdefault(record["id"], {})[stage] = record["stages"][stage]["text"]
        for reject in store.stage(stage).iter_rejects():
            out.setdefault(reject["id"], {})[stage] = f"reject: {reject['reason']}"
    return out


def main(argv: list[str]) -> int:
    out_path, overrides = argv[0], [a for a in argv[1:] if a != "--set"]
    config = load_synth_config(CI_CONFIG, overrides)
    try:
        components.run_seeds(config)
        for stage in STAGES:
            for shard in range(config.run.n_shards):
                components.run_shard(stage, shard, config)
    finally:
        components.STAGE_POOL.close()
    with open(out_path, "w") as fh:
        json.dump(outputs(config.run.store_dir), fh, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
