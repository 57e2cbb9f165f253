"""The pipeline declared once (pipeline.plan): its checks, and a new stage as one class + one entry."""

from __future__ import annotations

import pytest

from flows import components
from flows.config import load_synth_config
from flows.report import run_summary_markdown
from pipeline.plan import DEFAULT_PLAN, Plan, PlanError
from pipeline.store import WorkStore
from tests.support.flows import CI_CONFIG
from tests.support.stages import PassthroughVAS


class ToyStage:
    """A new per-shard stage: counts the words of the response."""

    name = "toy"
    schema = "sample"
    scope = "shard"
    requires = ("response",)
    produces = ("toy_words",)

    @classmethod
    def from_config(cls, config) -> ToyStage:
        return cls()

    def run(self, batch: list[dict]) -> list[dict]:
        return [{**r, "toy_words": len(r["response"].split())} if i % 2 == 0 else dict(r)
                for i, r in enumerate(batch)]  # every other record "forgets" its field


def test_the_default_pipeline_in_order_with_inputs():
    assert DEFAULT_PLAN.names == ["seeds", "describe", "reason", "anchor", "verify", "vas", "filter"]
    assert [DEFAULT_PLAN.input_of(n) for n in DEFAULT_PLAN.names] == [
        None, "seeds", "describe", "reason", "anchor", "verify", "vas"]
    assert [s.name for s in DEFAULT_PLAN.of_scope("shard")] == ["describe", "reason", "anchor", "verify", "vas"]
    assert DEFAULT_PLAN.last == "filter"


def test_a_plan_that_cannot_work_is_refused():
    with pytest.raises(PlanError, match="requires \\['toy_words'\\]"):
        Plan((DEFAULT_PLAN.source, type("Needy", (ToyStage,), {"name": "needy", "requires": ("toy_words",)})))
    with pytest.raises(PlanError, match="repeat"):
        Plan((DEFAULT_PLAN.source, ToyStage, ToyStage))
    with pytest.raises(PlanError, match="cannot follow a global stage"):
        DEFAULT_PLAN.with_stage(ToyStage, after="filter")
    with pytest.raises(PlanError, match="first stage"):
        Plan((ToyStage,))


def test_a_new_stage_is_one_class_and_one_entry(tmp_path):
    plan = DEFAULT_PLAN.with_stage(ToyStage, after="verify").replacing("vas", PassthroughVAS)
    assert plan.input_of("toy") == "verify" and plan.input_of("vas") == "toy"
    config = load_synth_config(CI_CONFIG, [f"run.store_dir={tmp_path / 'store'}", "seeds.n=12",
                                           f"publish.out_dir={tmp_path / 'out'}",
                                           f"publish.cards_dir={tmp_path / 'cards'}",
                                           "filter.vas_quantile=1.0"])
    funnel = components.run_local(config, plan)
    store = WorkStore(tmp_path / "store")
    verified = store.stage("verify").ids()
    toy = store.stage("toy")
    # the executor ran it on every partition, and the records contract checked what it declared
    assert toy.ids() | toy.ids("reject") == verified
    rejects = list(toy.iter_rejects())
    assert rejects and {(r["reason"], r["field"]) for r in rejects} == {("schema_invalid", "$.toy_words")}
    # the next stage read the new stage's results, and the kept samples carry its field
    assert store.stage("vas").ids() == toy.ids()
    assert all("toy_words" in r for r in store.stage("filter").iter_records())
    assert list(funnel["upstream"]) == ["seeds", "describe", "reason", "anchor", "verify", "toy", "vas"]
    # the run report and the data card list it in its place
    report = run_summary_markdown({"config_path": "x", "config_digest": "0" * 16, "store_dir": "s",
                                   "seconds": 1.0, "seeds": {"results": 12, "rejects": 0, "skipped": 0,
                                                             "started": 0.0, "finished": 1.0},
                                   "stages": {}, "funnel": funnel, "published": {}}, store, plan)
    assert "| verify |" in report and "| toy |" in report
    assert report.index("| toy |") < report.index("| vas |")
    card = (tmp_path / "cards" / config.publish.dataset_name / "README.md").read_text()
    assert "| toy |" in card and card.index("| toy |") < card.index("| vas |")
