"""Where the project's data files are: ``prompts/`` and ``schemas/`` of the repository.

They sit at the top of the repository (where people read and edit them) and ship inside the
package as ``pipeline.resources.prompts`` / ``pipeline.resources.schemas`` (see the
``package-dir`` mapping in ``pyproject.toml``), so an editable install, a wheel and
``pip install .`` all find them the same way.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path


@cache
def prompts_dir() -> Path:
    """The prompt templates (``*.j2``) and chat templates (``chat_templates/*.jinja``)."""
    return Path(str(files("pipeline.resources.prompts")))


@cache
def schemas_dir() -> Path:
    """The JSON Schemas of the record contract (``*.schema.json``)."""
    return Path(str(files("pipeline.resources.schemas")))
