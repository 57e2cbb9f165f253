"""The ``seeds`` stage: the first stage of a run, writing seed problems into the work store."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.records import Reject
from pipeline.seeds.config import SeedsConfig


class SeedStage:
    """Source stage: :meth:`source` streams seed records and rejects (rows that cannot be
    seeds); :meth:`run` passes the records on (the executor validates them as ``seed``)."""

    name = "seeds"
    schema = "seed"
    scope = "source"
    requires: tuple[str, ...] = ()
    produces = ("id", "images", "question", "gold_answer", "answer_type")

    def __init__(self, config: SeedsConfig | None = None):
        self.config = config or SeedsConfig()

    @classmethod
    def from_config(cls, config) -> SeedStage:
        return cls(config.seeds)

    def source(self) -> Iterator[dict | Reject]:
        from pipeline.seeds import iter_seeds

        return iter_seeds(self.config)

    def run(self, batch: list[dict]) -> list[dict | Reject]:
        return list(batch)
