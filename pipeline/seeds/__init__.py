"""Seed problems: the procedural generator and dataset loaders behind one iterator.

``iter_seeds(config)`` streams contract seed records (schemas/seed.schema.json) or
:class:`~pipeline.records.Reject` objects (stage ``"seeds"``) for rows that cannot become seeds.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.records import Reject
from pipeline.seeds.config import FAMILIES, SeedsConfig
from pipeline.seeds.procedural import generate_problem, iter_procedural, problem_plan


def iter_seeds(config: SeedsConfig) -> Iterator[dict | Reject]:
    """Seed records (or rejects) for ``config``: procedural, a local dataset, or the Hub."""
    if config.kind == "procedural":
        return iter_procedural(config)
    from pipeline.seeds.loader import iter_dataset  # datasets is imported only when needed

    return iter_dataset(config)


__all__ = [
    "FAMILIES",
    "SeedsConfig",
    "generate_problem",
    "iter_procedural",
    "iter_seeds",
    "problem_plan",
]
