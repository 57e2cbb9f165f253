"""One module per procedural problem family; each exposes ``generate(rng, level, size) -> Draft``."""
