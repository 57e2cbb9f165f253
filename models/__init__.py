"""Shipped model weights (packaged as ``pipeline.resources.models``): ``tiny-shapes``, the learned
reference model of :mod:`pipeline.vlm.reference` (``python -m trainer.reference`` rebuilds it)."""
