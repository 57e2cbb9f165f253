"""AVAR pipeline library (no Prefect here: orchestration lives in ``flows/``).

The stages, in the order :mod:`pipeline.plan` declares them::

    seeds -> describe -> reason -> anchor -> verify -> vas -> filter   (then publish)

Subpackages: :mod:`~pipeline.seeds` (seed problems), :mod:`~pipeline.synthesis` (teacher stages,
prompts, backends, request cache), :mod:`~pipeline.vlm` (models, processors, spans),
:mod:`~pipeline.lens` (the attention lens and the SPEC formulas), :mod:`~pipeline.vas` (the VAS
stage and CLI), :mod:`~pipeline.filtering`, :mod:`~pipeline.publishing`. Below them:
:mod:`~pipeline.executor` and :mod:`~pipeline.store` (running stages into the work store),
:mod:`~pipeline.records` (the record contract), :mod:`~pipeline.configio` (typed configs),
:mod:`~pipeline.atomic`, :mod:`~pipeline.response_format`, :mod:`~pipeline.questions`,
:mod:`~pipeline.templating`, :mod:`~pipeline.images`, :mod:`~pipeline.ids`, :mod:`~pipeline.paper`.
"""

__version__ = "0.1.0"
