"""Where the project's data files are: ``prompts/``, ``schemas/`` and ``models/`` of the repository.

They sit at the top of the repository (where people read and edit them) and ship inside the
package as ``pipeline.resources.prompts`` / ``.schemas`` / ``.models`` (see the
``package-dir`` mapping in ``pyproject.toml``), so an editable install, a wheel and
``pip install .`` all find them the same way. A source checkout that was never installed
(``python -m bench.gpu`` on a machine with its own torch and transformers, ``PYTHONPATH=.``) has
no such mapping: there the folders are read where they are in the checkout.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]


def _resource_dir(package: str, folder: str) -> Path:
    try:
        return Path(str(files(package)))
    except ModuleNotFoundError:
        if (_CHECKOUT / folder).is_dir():
            return _CHECKOUT / folder
        raise ModuleNotFoundError(f"{package}: the avar package is not installed and no {folder}/ folder "
                                  f"is beside it in {_CHECKOUT}; run `pip install -e .`") from None


@cache
def prompts_dir() -> Path:
    """The prompt templates (``*.j2``) and chat templates (``chat_templates/*.jinja``)."""
    return _resource_dir("pipeline.resources.prompts", "prompts")


@cache
def schemas_dir() -> Path:
    """The JSON Schemas of the record contract (``*.schema.json``)."""
    return _resource_dir("pipeline.resources.schemas", "schemas")
