"""One way to build a Jinja environment for the project's templates (prompts, questions, cards).

All of them are chat or Markdown text, not HTML: autoescaping is off (it would corrupt math such
as ``a < b``) and an undefined variable is an error (``StrictUndefined``), never an empty string.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2


def environment(directory: str | Path, *, trim_blocks: bool = False,
                keep_trailing_newline: bool = False,
                filters: Mapping[str, Callable] | None = None,
                globals: Mapping[str, Any] | None = None) -> jinja2.Environment:
    """A strict, non-escaping environment loading templates from ``directory``.

    ``trim_blocks`` also strips the whitespace around block tags (``trim_blocks`` and
    ``lstrip_blocks`` in Jinja's terms), for templates laid out with one tag per line.
    """
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(directory)),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             trim_blocks=trim_blocks, lstrip_blocks=trim_blocks,
                             keep_trailing_newline=keep_trailing_newline)
    env.filters.update(filters or {})
    env.globals.update(globals or {})
    return env
