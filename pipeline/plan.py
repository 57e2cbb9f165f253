"""The pipeline, declared once: an ordered list of stage classes.

Each class declares its ``name``, its ``scope`` ("source": writes the first stage from outside
data; "shard": runs per partition of the ids; "global": reads the whole input stage at once),
the record ``schema`` of its outputs, the fields it ``requires`` of its input records and the
fields it ``produces`` (the records contract the executor checks), and builds itself from the
run's config (``from_config``). A stage's input is the stage before it in the list. The flow,
the run report, the card's stage order and the executor loop all read this list, so a new stage
is one class and one entry here (``tests/test_plan.py`` adds a toy stage).

    seeds -> describe -> reason -> anchor -> verify -> vas -> filter   (then publish)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import PermanentError
from pipeline.filtering.filter import FilterStage
from pipeline.seeds.stage import SeedStage
from pipeline.synthesis.stages import AnchorStage, DescribeStage, ReasonStage
from pipeline.vas.stage import VASStage
from pipeline.verify import VerifyStage

PIPELINE: tuple[type, ...] = (SeedStage, DescribeStage, ReasonStage, AnchorStage, VerifyStage,
                              VASStage, FilterStage)
SCOPES = ("source", "shard", "global")
SEED_FIELDS = ("id", "images", "question", "gold_answer", "answer_type", "choices", "source",
               "scene", "difficulty")


class PlanError(ValueError, PermanentError):
    """The declared stages do not form a pipeline (names, scopes, requirements)."""


@dataclass(frozen=True)
class Plan:
    """An ordered, checked list of stage classes (:data:`PIPELINE` by default)."""

    stages: tuple[type, ...] = PIPELINE

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise PlanError(f"stage names repeat: {names}")
        scopes = [s.scope for s in self.stages]
        if any(scope not in SCOPES for scope in scopes):
            raise PlanError(f"unknown scope in {scopes}; expected {SCOPES}")
        if not scopes or scopes[0] != "source" or scopes.count("source") != 1:
            raise PlanError(f"the first stage, and only it, must be the source: {scopes}")
        if "global" in scopes and "shard" in scopes[scopes.index("global"):]:
            raise PlanError("per-shard stages cannot follow a global stage")
        available = set(SEED_FIELDS)
        for stage in self.stages:
            missing = [f for f in stage.requires if f not in available]
            if missing:
                raise PlanError(f"stage {stage.name!r} requires {missing}, which no stage before it produces")
            available.update(stage.produces)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def get(self, name: str) -> type:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"unknown stage {name!r}; the pipeline has {self.names}")

    def input_of(self, name: str) -> str | None:
        """The stage whose results ``name`` reads (None for the source)."""
        index = self.names.index(self.get(name).name)
        return self.names[index - 1] if index else None

    @property
    def source(self) -> type:
        return self.stages[0]

    def of_scope(self, scope: str) -> list[type]:
        return [s for s in self.stages if s.scope == scope]

    @property
    def last(self) -> str:
        """The stage whose results are published."""
        return self.names[-1]

    def replacing(self, name: str, stage: type) -> Plan:
        """A copy with the stage named ``name`` replaced by ``stage`` (e.g. a stand-in scorer)."""
        index = self.names.index(self.get(name).name)
        return Plan((*self.stages[:index], stage, *self.stages[index + 1:]))

    def with_stage(self, stage: type, after: str) -> Plan:
        """A copy with ``stage`` inserted after the stage named ``after``."""
        index = self.names.index(self.get(after).name) + 1
        return Plan((*self.stages[:index], stage, *self.stages[index:]))


DEFAULT_PLAN = Plan()


def plan_of(stages: Sequence[type] | Plan | None) -> Plan:
    """``stages`` as a :class:`Plan` (None: the default pipeline)."""
    if stages is None:
        return DEFAULT_PLAN
    return stages if isinstance(stages, Plan) else Plan(tuple(stages))
