"""Prompt templates: one Jinja file per teacher stage in ``prompts/``, versioned and hashed.

A template file starts with a version header ``{#- version: 1.0.0 -#}`` and defines two blocks,
``system`` and ``user``. :meth:`PromptTemplate.render` turns them into OpenAI-style chat messages:
the system turn as a string, the user turn as content parts where ``{{ image(i) }}`` becomes the
part ``{"type": "image", "index": i}`` (the teacher backends encode the bytes).

Untrusted text (questions, earlier teacher outputs) enters templates only through the ``fence``
filter, which wraps it in a Markdown code fence longer than any backtick run inside it, so a
question cannot close the fence and pose as instructions. Image markers carry a per-render random
nonce, so text that imitates a marker stays text.

The version and the sha256 of the file text go into every sample's provenance and into the
request-cache key: editing a prompt invalidates exactly the requests it shaped.

``with_images`` (default true) says whether the teacher reads images: for a text-only teacher
(``teacher.modality: text``) it is false, the template leaves the image parts out, and a
template that still places an image is an error. Only when images are sent must every image
appear exactly once.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from pipeline.questions import choice_letter
from pipeline.resources import prompts_dir
from pipeline.templating import environment

REQUIRED_BLOCKS = ("system", "user")
_VERSION_RE = re.compile(r"\A\{#-?\s*version:\s*(\d+\.\d+\.\d+)\s*-?#\}")
_BACKTICKS_RE = re.compile(r"`+")


class PromptError(ValueError):
    """A template that cannot be loaded or rendered; the message names the template and field."""


def fence(text: Any, info: str = "text") -> str:
    """Wrap untrusted ``text`` in a code fence that nothing inside it can close."""
    if text is None:
        raise PromptError("fence: got None; pass a string (an absent field must be handled in the template)")
    body = str(text)
    longest = max((len(m.group(0)) for m in _BACKTICKS_RE.finditer(body)), default=0)
    marks = "`" * max(3, longest + 1)
    return f"{marks}{info}\n{body}\n{marks}"


def lettered(choices: list) -> str:
    """Options as lines ``A. ...``, ``B. ...`` (fence the result: option text is untrusted)."""
    return "\n".join(f"{choice_letter(i)}. {c}" for i, c in enumerate(choices))


def _environment(directory: Path) -> jinja2.Environment:
    return environment(directory, trim_blocks=True, filters={"fence": fence, "lettered": lettered},
                       globals={"choice_letter": choice_letter})


@dataclass
class PromptTemplate:
    """A loaded template. ``render(**ctx)`` returns ``[system message, user message]``."""

    name: str
    version: str
    sha256: str
    path: Path
    _template: jinja2.Template = field(repr=False, compare=False)

    def provenance(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def _block(self, block: str, ctx: dict) -> str:
        try:
            return "".join(self._template.blocks[block](self._template.new_context(ctx))).strip()
        except jinja2.UndefinedError as e:
            raise PromptError(f"template {self.name!r} block {block!r}: {e.message}") from None

    def render(self, **ctx: Any) -> list[dict]:
        nonce = secrets.token_hex(8)
        used: list[int] = []

        def image(index: int) -> str:
            if not isinstance(index, int) or index < 0:
                raise PromptError(f"template {self.name!r}: image() needs an index >= 0, got {index!r}")
            used.append(index)
            return f"\x00img-{nonce}-{index}\x00"

        ctx.setdefault("with_images", True)
        full = dict(ctx, image=image)
        system = self._block("system", full)
        user = self._block("user", full)
        n_images = ctx.get("n_images")
        if not ctx["with_images"]:
            if used:  # a text-only teacher would be sent images it cannot read
                raise PromptError(f"template {self.name!r}: images referenced {sorted(used)} although "
                                  "with_images is false (a text-only teacher); guard them with "
                                  "{% if with_images %}")
        elif n_images is not None and sorted(used) != list(range(n_images)):
            raise PromptError(f"template {self.name!r}: images referenced {sorted(used)} but the "
                              f"record has {n_images} image(s); each must appear exactly once")
        return [{"role": "system", "content": system},
                {"role": "user", "content": _content_parts(user, nonce)}]


def _content_parts(text: str, nonce: str) -> list[dict]:
    parts: list[dict] = []
    marker = re.compile(f"\x00img-{nonce}-(\\d+)\x00")
    pos = 0
    for m in marker.finditer(text):
        chunk = text[pos:m.start()].strip()
        if chunk:
            parts.append({"type": "text", "text": chunk})
        parts.append({"type": "image", "index": int(m.group(1))})
        pos = m.end()
    tail = text[pos:].strip()
    if tail:
        parts.append({"type": "text", "text": tail})
    return parts


def load_template(name: str, directory: str | Path | None = None) -> PromptTemplate:
    """Load ``<directory>/<name>.j2`` (default ``prompts/``), checking header and blocks."""
    directory = Path(directory) if directory is not None else prompts_dir()
    path = directory / f"{name}.j2"
    if not path.is_file():
        available = sorted(p.stem for p in directory.glob("*.j2"))
        raise PromptError(f"template {name!r}: no file {path} (available: {available})")
    text = path.read_text(encoding="utf-8")
    m = _VERSION_RE.match(text)
    if not m:
        raise PromptError(f"template {name!r} ({path}): first line must be a version header "
                          "such as '{#- version: 1.0.0 -#}'")
    env = _environment(directory)
    try:
        template = env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise PromptError(f"template {name!r} ({path}) line {e.lineno}: {e.message}") from None
    missing = [b for b in REQUIRED_BLOCKS if b not in template.blocks]
    if missing:
        raise PromptError(f"template {name!r} ({path}): missing block(s) {missing}")
    return PromptTemplate(name=name, version=m.group(1),
                          sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                          path=path, _template=template)
