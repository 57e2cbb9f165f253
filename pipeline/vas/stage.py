"""The ``vas`` stage of a synthesis run: response VAS of each sample on the reference model."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.configio import ConfigError
from pipeline.records import Reject
from pipeline.synthesis.controls import controls_for
from pipeline.vas import ScoreError, VASConfig, VASItem, item_from_record


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

    def preflight(self) -> None:
        """The reference model can be found before any teacher is paid: a tiny alias, a local
        folder of a supported family, or a Hub id (in the local cache when ``HF_HUB_OFFLINE``
        is set)."""
        model = self.config.model
        if self.model is not None:
            return
        from pipeline.vlm.reference import REFERENCE_ALIAS, ReferenceModelError, reference_path
        from pipeline.vlm.tiny import TINY_ALIASES  # torch: only when a run is checked

        if model in TINY_ALIASES:
            return
        if model == REFERENCE_ALIAS:
            try:
                reference_path()
            except ReferenceModelError as err:
                raise ConfigError(f"vas.model: {err}") from None
            return
        if Path(model).is_dir():
            self._check_family(Path(model))
            return
        if Path(model).expanduser().is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
            raise ConfigError(f"vas.model: {model!r} is neither a folder nor a Hub id (org/name)")
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(model, "config.json"), str):
                raise ConfigError(f"vas.model: {model!r} is not in the local Hugging Face cache and "
                                 "HF_HUB_OFFLINE is set; download it first or point vas.model at a folder")

    @staticmethod
    def _check_family(folder: Path) -> None:
        import json

        from pipeline.vlm import adapter_for

        config = folder / "config.json"
        if not config.is_file():
            return  # loading will say what is missing
        try:
            adapter_for(json.loads(config.read_text()).get("model_type"))
        except ValueError as err:
            raise ConfigError(f"vas.model: {folder}: {err}") from None

    def run(self, batch: list[dict]) -> list[dict | Reject]:
        from pipeline.vas.scoring import (  # torch: loaded on first use
            load_scoring_model,
            score_items,
        )

        if self.model is None:
            self.model, self.processor = load_scoring_model(self.config)
        outputs: list[dict | Reject | None] = [None] * len(batch)
        items, owners = [], []  # owners: (position in batch, control kind or None)
        for pos, record in enumerate(batch):
            try:
                item = item_from_record(record, self.config.queries)
            except ScoreError as err:
                outputs[pos] = self._reject(record, err)
                continue
            items.append(item)
            owners.append((pos, None))
            for control in controls_for(record, item.images, self.config.controls):
                items.append(VASItem(key=f"{item.key}#{control.kind}", images=control.images or item.images,
                                     question=item.question, response=control.response))
                owners.append((pos, control.kind))
        scores = score_items(self.model, self.processor, items, self.config) if items else []
        controls: dict[int, dict] = {}
        for (pos, kind), score in zip(owners, scores, strict=True):
            if kind is None:
                record = batch[pos]
                outputs[pos] = self._reject(record, score) if isinstance(score, ScoreError) else {**record, "vas": score}
            elif not isinstance(score, ScoreError):
                controls.setdefault(pos, {})[kind] = score["views"]
        for pos, views in controls.items():
            if isinstance(outputs[pos], dict):
                outputs[pos]["vas"]["controls"] = _with_shared_user_views(views, outputs[pos]["vas"]["views"])
        return outputs

    def _reject(self, record: dict, err: ScoreError) -> Reject:
        return Reject(id=record.get("id") or "unknown", stage=self.name, reason=err.reason,
                      message=err.message, field=err.field, source=record.get("source"))



def _with_shared_user_views(controls: dict[str, dict], real: dict) -> dict[str, dict]:
    """Each control's views; the text controls (same images, same question) take the real
    sample's user views, which causal attention makes identical to theirs (copied rather than
    recomputed, so their separation shows the exact 0.5 instead of rounding noise between
    batches of other lengths)."""
    return {kind: {"views": {**views, "user": real["user"]} if kind != "blank_image" else views}
            for kind, views in controls.items()}
