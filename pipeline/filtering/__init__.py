"""Which synthesized samples are kept: :mod:`~pipeline.filtering.filter` (the checks, the VAS
criterion and the funnel) and :mod:`~pipeline.filtering.dedup` (near-duplicates by MinHash)."""
