"""VARD synthesis (SPEC "VARD"): the three teacher stages and what they stand on.

- :mod:`~pipeline.synthesis.stages`: describe -> reason -> anchor, each its own teacher, prompt
  and sampling;
- :mod:`~pipeline.synthesis.teachers`: the teacher backends behind one interface, and their registry;
- :mod:`~pipeline.synthesis.prompts`: the versioned Jinja prompts of ``prompts/``;
- :mod:`~pipeline.synthesis.cache`: the request cache (a success is never paid for twice);
- :mod:`~pipeline.synthesis.usage`: tokens and their cost;
- :mod:`~pipeline.synthesis.anchors`: how "returns to the image" is counted.
"""
