"""Deterministic test images."""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_image(seed: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A deterministic random RGB image of ``size`` = (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")
