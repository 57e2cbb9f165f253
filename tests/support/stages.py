"""Stand-in stages for tests and benchmarks about the store rather than the scores."""

from __future__ import annotations


class PassthroughVAS:
    """Stage ``vas`` without the model: a pseudo score from the id (plugged in with
    ``DEFAULT_PLAN.replacing("vas", PassthroughVAS)``)."""

    name = "vas"
    schema = "sample"
    scope = "shard"
    requires = ("response",)
    produces = ("vas",)

    @classmethod
    def from_config(cls, config) -> PassthroughVAS:
        return cls()

    def run(self, batch: list[dict]) -> list[dict]:
        out = []
        for record in batch:
            raw = 5.0 + int(record["id"][:6], 16) % 1000 / 100.0
            out.append({**record, "vas": {"model": "bench-passthrough", "queries": "response",
                                          "max_pixels": 262144, "layers": [], "raw": raw,
                                          "normalized": raw / 10.0, "n_image_tokens": 100,
                                          "n_system_tokens": 10}})
        return out
