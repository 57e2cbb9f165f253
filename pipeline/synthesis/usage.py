"""Teacher usage and its cost: requests, failures and tokens, priced per million tokens.

One formula (:func:`token_cost_usd`) serves the live run report, the stage summaries and the
data card; prices come from each teacher's config (``price_input_per_mtok``,
``price_output_per_mtok``), times ``batch_discount`` for a teacher in mode batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.synthesis.teachers.base import TeacherError, TeacherResponse


def token_cost_usd(prompt_tokens: int, completion_tokens: int, price_input_per_mtok: float,
                   price_output_per_mtok: float) -> float:
    """Estimated USD for the given token counts at per-million-token prices."""
    return (prompt_tokens * price_input_per_mtok + completion_tokens * price_output_per_mtok) / 1e6


def cost_usd(config: Any, prompt_tokens: int, completion_tokens: int) -> float:
    """:func:`token_cost_usd` at the prices of a teacher config, times its ``batch_discount``
    when it runs in mode batch."""
    factor = config.price_factor() if hasattr(config, "price_factor") else 1.0
    return factor * token_cost_usd(prompt_tokens, completion_tokens, config.price_input_per_mtok,
                                   config.price_output_per_mtok)


@dataclass
class UsageTotals:
    """Requests, failures and tokens summed over results (a stage keeps one per teacher).

    Failed results count their tokens too when the backend knows them (a truncated completion
    is billed in full).
    """

    requests: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, result: TeacherResponse | TeacherError) -> None:
        self.requests += 1
        self.failures += isinstance(result, TeacherError)
        self.prompt_tokens += int(getattr(result, "prompt_tokens", 0) or 0)
        self.completion_tokens += int(getattr(result, "completion_tokens", 0) or 0)

    def cost_usd(self, config: Any) -> float:
        return cost_usd(config, self.prompt_tokens, self.completion_tokens)

    def as_dict(self, config: Any = None) -> dict:
        out = {"requests": self.requests, "failures": self.failures,
               "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        if config is not None:
            out["cost_usd"] = round(self.cost_usd(config), 6)
        return out
