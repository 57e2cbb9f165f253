"""Teacher backends behind one small interface (see :mod:`pipeline.teachers.base`)."""

from pipeline.teachers.base import (
    Teacher,
    TeacherConfig,
    TeacherError,
    TeacherRequest,
    TeacherResponse,
    build_teacher,
)

__all__ = ["Teacher", "TeacherConfig", "TeacherError", "TeacherRequest", "TeacherResponse", "build_teacher"]
