"""Shared fixtures: the tiny offline Qwen2.5-VL and deterministic images.

The tiny model lives in ``$AVAR_CACHE`` (default ``~/.cache/avar``) and is built once (~3 s).
Session-scoped model/processor fixtures are shared: treat them as read-only (no training,
no ``set_attn_implementation``); a test that mutates a model loads its own copy.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hugging Face Hub

import pytest

from tests.support.images import make_image


@pytest.fixture(scope="session")
def tiny_model_dir():
    from pipeline.vlm import tiny_model_path
    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_model_dir):
    from pipeline.vlm import load_model_and_processor
    model, processor = load_model_and_processor(tiny_model_dir)
    return model.eval(), processor


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from pipeline.vlm import load_processor
    return load_processor(tiny_model_dir)


@pytest.fixture
def image_factory():
    """``image_factory(seed, (width, height))`` -> deterministic PIL image."""
    return make_image
