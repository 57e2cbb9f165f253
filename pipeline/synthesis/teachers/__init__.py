"""Teacher backends behind one small interface (:mod:`pipeline.synthesis.teachers.base`).

:data:`BACKENDS` is the registry: ``teacher.backend`` in a config names one of its keys, and the
backend's module is imported only when a teacher of that kind is built (so the CPU install never
imports what it does not use).
"""

from __future__ import annotations

import importlib
from typing import get_args

from pipeline.synthesis.teachers.base import (
    Backend,
    OnResult,
    Teacher,
    TeacherConfig,
    TeacherError,
    TeacherRequest,
    TeacherResponse,
)

BACKENDS: dict[str, str] = {
    "openai": "pipeline.synthesis.teachers.openai_backend:OpenAITeacher",
    "programmatic": "pipeline.synthesis.teachers.programmatic:ProgrammaticTeacher",
}
assert set(BACKENDS) == set(get_args(Backend)), "the Backend literal and the registry must agree"


def teacher_class(backend: str) -> type[Teacher]:
    """The class registered for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"teacher.backend: unknown backend {backend!r} ({' | '.join(BACKENDS)})")
    module, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), name)


def build_teacher(config: TeacherConfig) -> Teacher:
    """A teacher for ``config`` (``config.backend`` picks the class)."""
    return teacher_class(config.backend)(config)


__all__ = ["BACKENDS", "OnResult", "Teacher", "TeacherConfig", "TeacherError", "TeacherRequest",
           "TeacherResponse", "build_teacher", "teacher_class"]
