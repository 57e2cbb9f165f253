"""Visual anchors: how we count "returns to the image" in a reasoning chain.

The paper asks the anchor teacher to make the chain "explicitly return to the image at the steps
that depend on it" but gives no counting rule. **Ours**: an anchor is one sentence inside
``<think>`` that contains a look-back cue from :data:`CUES` (case-insensitive, word-bounded).
Each anchor is reported with its character span, the cue that matched and, when the record has
scene metadata, the id of the first scene element whose label the sentence names. The cue list is
versioned (:data:`CUES_VERSION`): changing it changes counts, so it is recorded in provenance.
"""

from __future__ import annotations

import re

from pipeline.response_format import think_text

CUES_VERSION = "1"
CUES = (
    "look back at", "looking back at", "look again at", "looking again at", "look at the image",
    "looking at the image", "look at the figure", "looking at the figure",
    "check the image", "checking the image", "check the figure", "checking the figure",
    "re-examine the image", "re-examining the image", "re-examine the figure",
    "return to the image", "returning to the image", "back to the image", "back to the figure",
    "zoom in on", "in the image", "in the figure", "in the chart", "in the table",
    "the image shows", "the figure shows", "the chart shows", "the table shows",
    "as shown in the image", "as shown in the figure", "verify against the image",
    "verifying against the image", "confirm in the image", "the image confirms",
)
_CUE_RE = re.compile(r"\b(" + "|".join(re.escape(c) for c in sorted(CUES, key=len, reverse=True)) + r")\b",
                     re.IGNORECASE)
_SENTENCE_RE = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")


def find_anchors(response: str, scene: dict | None = None) -> list[dict]:
    """Anchors of a ``<think>...</think><answer>...</answer>`` response (schema: sample#/$defs/anchor)."""
    body, offset = think_text(response)
    labels = []
    for el in (scene or {}).get("elements", []) or []:
        for name in {el.get("label"), el.get("id")}:
            if name and len(str(name)) >= 1:
                labels.append((str(name), el["id"]))
    labels.sort(key=lambda p: len(p[0]), reverse=True)
    anchors = []
    for m in _SENTENCE_RE.finditer(body):
        sentence = m.group(0).strip()
        cue = _CUE_RE.search(sentence)
        if not sentence or not cue:
            continue
        start = offset + m.start() + (len(m.group(0)) - len(m.group(0).lstrip()))
        element = next((eid for name, eid in labels if _names(sentence, name)), None)
        anchors.append({"text": sentence, "start": start, "end": start + len(sentence),
                        "cue": cue.group(1).lower(), "element": element})
    return anchors


def _names(sentence: str, label: str) -> bool:
    return re.search(r"(?<![\w])" + re.escape(label) + r"(?![\w])", sentence, re.IGNORECASE) is not None
