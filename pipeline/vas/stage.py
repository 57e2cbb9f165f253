"""The ``vas`` stage of a synthesis run: response VAS of each sample on the reference model."""

from __future__ import annotations

from pipeline.records import Reject
from pipeline.vas import ScoreError, VASConfig, item_from_record


class VASStage:
    """Executor stage ``vas``: adds ``record["vas"]`` (response VAS by default) to each sample.

    The model is loaded on the first :meth:`run` and reused; pass ``model``/``processor`` to
    share one already loaded.
    """

    name = "vas"
    schema = "sample"
    scope = "shard"
    requires = ("question", "response", "images")
    produces = ("vas",)

    @classmethod
    def from_config(cls, config) -> VASStage:
        return cls(config.vas)

    def __init__(self, config: VASConfig | None = None, model=None, processor=None):
        self.config = config or VASConfig()
        self.model, self.processor = model, processor

    def run(self, batch: list[dict]) -> list[dict | Reject]:
        from pipeline.vas.scoring import (  # torch: loaded on first use
            load_scoring_model,
            score_items,
        )

        if self.model is None:
            self.model, self.processor = load_scoring_model(self.config)
        outputs: list[dict | Reject | None] = [None] * len(batch)
        items, positions = [], []
        for pos, record in enumerate(batch):
            try:
                items.append(item_from_record(record, self.config.queries))
                positions.append(pos)
            except ScoreError as err:
                outputs[pos] = self._reject(record, err)
        scores = score_items(self.model, self.processor, items, self.config) if items else []
        for pos, score in zip(positions, scores, strict=True):
            record = batch[pos]
            outputs[pos] = self._reject(record, score) if isinstance(score, ScoreError) else {**record, "vas": score}
        return outputs

    def _reject(self, record: dict, err: ScoreError) -> Reject:
        return Reject(id=record.get("id") or "unknown", stage=self.name, reason=err.reason,
                      message=err.message, field=err.field, source=record.get("source"))

