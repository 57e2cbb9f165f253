"""Preview procedural seeds: write each problem's PNG, its record and the programmatic texts.

    python -m pipeline.seeds --out /tmp/preview --n 8 --families charts tables --difficulty 4 5

For each problem ``<index>-<family>-L<level>.png`` and ``.json`` (the record without image
bytes, plus the describe / reason / anchor texts of the programmatic teacher) are written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from pipeline.seeds import FAMILIES, SeedsConfig, iter_seeds
from pipeline.synthesis.teachers.programmatic import write


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.seeds", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="folder to write previews into")
    parser.add_argument("--n", type=int, default=8, help="number of problems")
    parser.add_argument("--seed", type=int, default=0, help="master seed")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--difficulty", nargs=2, type=int, default=[1, 5], metavar=("MIN", "MAX"))
    parser.add_argument("--size", type=int, default=448, help="canvas side in pixels")
    args = parser.parse_args(argv)
    config = SeedsConfig(
        n=args.n,
        seed=args.seed,
        families=args.families,
        image_size=args.size,
        difficulty_min=args.difficulty[0],
        difficulty_max=args.difficulty[1],
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, record in enumerate(
        tqdm(iter_seeds(config), total=args.n, desc="seeds", unit="problem")
    ):
        stem = f"{index:04d}-{record['scene']['family']}-L{record['difficulty']}"
        (out / f"{stem}.png").write_bytes(record["images"][0]["bytes"])
        meta = dict(
            record,
            images=[{k: v for k, v in im.items() if k != "bytes"} for im in record["images"]],
        )
        meta["programmatic"] = {
            stage: write(stage, record) for stage in ("describe", "reason", "anchor")
        }
        (out / f"{stem}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    print(f"wrote {args.n} problems to {out}")


if __name__ == "__main__":
    main()
