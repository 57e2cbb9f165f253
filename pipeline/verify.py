"""Answer checking: the response format, and the predicted answer against the gold answer.

:func:`answers_match` is the one correctness test of the project: the verify stage uses it here,
the RL trainer imports it as ``r_acc``. Numbers and expressions are compared with Hugging Face
``math_verify`` (fractions, decimals, radicals, equations, sets, percentages) after a light
clean-up that drops what math_verify would misread as variables: units, degree signs,
"the answer is" prefixes. Multiple-choice answers are normalised to option letters first
("(B)", "B.", "b", "Answer: B" or the option text itself). Free-text answers compare by
normalised string, falling back to math_verify when both sides hold mathematics.

Percentages are compared by their number ("12.5%" matches "12.5", not "0.125"): answer keys write
both ways and the percent form is by far the more common intent.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from pipeline.questions import choice_letter
from pipeline.records import Reject, utcnow
from pipeline.response_format import extract_answer

_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]
_MATH_TIMEOUT_S = 5

_WRAPPERS_RE = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_PREFIX_RE = re.compile(r"^(?:(?:so|thus|therefore|hence)\s*,?\s*)?(?:the\s+)?(?:final\s+|correct\s+)?"
                        r"(?:answer|option|choice|result|value)\s*(?:is|=|:|：)?\s*(?:option|choice)?\s*[:：]?\s*",
                        re.IGNORECASE)
_APPROX_RE = re.compile(r"^(?:approximately|approx\.?|about|around|roughly|≈|~)\s*", re.IGNORECASE)
_DEGREE_RE = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°|º|˚|\bdegrees?\b|\bdeg\b)", re.IGNORECASE)
_PERCENT_RE = re.compile(r"\s*(?:\\%|%|\bpercent\b)", re.IGNORECASE)
_LHS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(?:\([A-Za-z]\))?\s*=\s*(?=\S)")
_UNIT_RE = re.compile(r"\s*(?<![\\A-Za-z])(?!pi\b)[A-Za-z]+(?:\^?\{?[23]\}?|[²³])?"
                      r"(?:\s*/\s*[A-Za-z]+(?:\^?\{?[23]\}?|[²³])?)?\s*$")
_WORD_RE = re.compile(r"(?<!\\)\b(?!(?:sqrt|sin|cos|tan|cot|sec|csc|log|ln|exp|pi|frac|infty|cup|cap)\b)[A-Za-z]{3,}\b")
# Power towers (9^{9^{9^9}}) make sympy evaluate for hours; outside the main thread there is no
# timeout to stop it, so such answers are not handed to math_verify there.
_TOWER_RE = re.compile(r"\d\s*(?:\^|\*\*)\s*[{(]?\s*\d+(?:\.\d+)?\s*(?:\^|\*\*)")
_MAX_MATH_CHARS = 1000
_LETTER_ONLY_RE = re.compile(r"^\(?\[?([A-Za-z])\]?\)?$")
_LETTER_DELIM_RE = re.compile(r"^(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])\s*[.:)\]])\s*(.*)$", re.DOTALL)
_LETTER_SPACE_RE = re.compile(r"^([A-Z])\s+(.+)$", re.DOTALL)
_ANSWER_IS_RE = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*[(\[]?([A-Z])[)\]]?(?![\w(])", re.IGNORECASE)


@dataclass
class Verdict:
    correct: bool
    method: str  # math_verify | choice_letter | choice_text | exact | unparsable
    parsed: bool  # False when the predicted answer could not be read at all
    predicted_norm: str = ""
    gold_norm: str = ""


def _in_main_thread() -> bool:
    # math_verify enforces its timeout with SIGALRM, which only works in the main thread.
    return threading.current_thread() is threading.main_thread()


def _clean(text: str) -> str:
    s = unicodedata.normalize("NFKC", text).strip()
    s = s.replace("−", "-").replace("×", "*").replace("÷", "/").replace("π", "\\pi ")
    s = re.sub(r"√\s*\(([^()]*)\)", r"\\sqrt{\1}", s)
    s = re.sub(r"√\s*([0-9A-Za-z.]+)", r"\\sqrt{\1}", s)
    for _ in range(3):
        s = _WRAPPERS_RE.sub(r"\1", s)
    s = s.strip().strip("$").strip()
    if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2].strip()
    s = _PREFIX_RE.sub("", s)
    s = _APPROX_RE.sub("", s)
    return s.rstrip(".").strip()


def _strip_units(s: str) -> str:
    s = _PERCENT_RE.sub("", _DEGREE_RE.sub("", s)).strip()
    s = _LHS_RE.sub("", s)
    for _ in range(3):  # "5 square units", "3 m/s"
        stripped = _UNIT_RE.sub("", s).strip()
        if stripped == s or not re.search(r"\d", stripped):
            break
        s = stripped
    return s.rstrip(".").strip()


def _math(text: str, numeric: bool) -> list:
    s = _clean(text)
    if numeric:
        s = _strip_units(s)
    if not s or len(s) > _MAX_MATH_CHARS:
        return []
    timeout = _MATH_TIMEOUT_S if _in_main_thread() else None
    if timeout is None and _TOWER_RE.search(s):
        return []
    # Wrapped in $...$ math_verify reads "1+x" whole; raw, it extracts a number from prose.
    attempts = [s] if _WORD_RE.search(s) else [f"${s}$", s]
    for attempt in attempts:
        try:
            parsed = parse(attempt, extraction_config=_EXTRACTION, parsing_timeout=timeout)
        except Exception:  # noqa: BLE001 - math_verify raises assorted sympy errors on junk
            parsed = []
        if parsed:
            return parsed
    return []


def _math_equal(gold: list, predicted: list) -> bool:
    timeout = _MATH_TIMEOUT_S if _in_main_thread() else None
    try:
        return bool(verify(gold, predicted, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001
        return False


def _norm_text(text: str) -> str:
    s = unicodedata.normalize("NFKC", _clean(text)).casefold()
    s = re.sub(r"[\s]+", " ", re.sub(r"[^\w\s.\-/+]", " ", s)).strip(" .")
    return re.sub(r"^(?:the|a|an) ", "", s)


def choice_index(answer: str, choices: list[str] | None) -> tuple[int | None, str]:
    """Option index named by ``answer`` and how it was read ("choice_letter" | "choice_text")."""
    n = len(choices) if choices else 26
    letters = {choice_letter(i): i for i in range(n)}
    s = _clean(answer)

    def by_letter(letter: str | None) -> int | None:
        return letters.get(letter.upper()) if letter else None

    m = _LETTER_ONLY_RE.match(s)
    if m and by_letter(m.group(1)) is not None:
        return by_letter(m.group(1)), "choice_letter"
    if choices:
        wanted = _norm_text(s)
        hits = [i for i, c in enumerate(choices) if _norm_text(c) == wanted]
        if len(hits) == 1:
            return hits[0], "choice_text"
    m = _LETTER_DELIM_RE.match(s)
    if m:
        idx = by_letter(m.group(1) or m.group(2) or m.group(3))
        if idx is not None:
            return idx, "choice_letter"
    m = _LETTER_SPACE_RE.match(s)
    if m and choices and by_letter(m.group(1)) is not None and \
            _norm_text(m.group(2)) == _norm_text(choices[by_letter(m.group(1))]):
        return by_letter(m.group(1)), "choice_letter"
    named = [x.group(1) for x in _ANSWER_IS_RE.finditer(s) if x.group(1).isupper()]
    if named and by_letter(named[-1]) is not None:  # "... so the answer is (C)."
        return by_letter(named[-1]), "choice_letter"
    if choices:
        pred = _math(s, numeric=True)
        if pred:
            hits = [i for i, c in enumerate(choices) if (g := _math(c, numeric=True)) and _math_equal(g, pred)]
            if len(hits) == 1:
                return hits[0], "choice_text"
    return None, "unparsable"


def compare(predicted: str, gold: str, answer_type: str = "number",
            choices: list[str] | None = None) -> Verdict:
    """Full comparison with the method used; see :func:`answers_match`."""
    if predicted is None or not str(predicted).strip():
        return Verdict(False, "unparsable", False)
    predicted, gold = str(predicted), str(gold)
    if answer_type == "choice":
        p_idx, how = choice_index(predicted, choices)
        g_idx, _ = choice_index(gold, choices)
        if p_idx is None:
            return Verdict(False, "unparsable", False, gold_norm=str(g_idx))
        if g_idx is None:  # the gold is neither a letter nor an option: compare the text
            return Verdict(_norm_text(predicted) == _norm_text(gold), "exact", True)
        return Verdict(p_idx == g_idx, how, True, str(p_idx), str(g_idx))
    if answer_type in ("number", "expression"):
        numeric = answer_type == "number"
        g, p = _math(gold, numeric), _math(predicted, numeric)
        if not g:  # a gold we cannot parse: fall back to text
            return Verdict(_norm_text(predicted) == _norm_text(gold), "exact", True)
        if not p:
            return Verdict(False, "unparsable", False, gold_norm=str(g[-1]))
        return Verdict(_math_equal(g, p), "math_verify", True, str(p[-1]), str(g[-1]))
    # free text
    if _norm_text(predicted) == _norm_text(gold):
        return Verdict(True, "exact", True)
    if re.search(r"\d", gold):
        g, p = _math(gold, True), _math(predicted, True)
        if g and p and _math_equal(g, p):
            return Verdict(True, "math_verify", True)
    return Verdict(False, "exact", True)


def answers_match(predicted: str, gold: str, answer_type: str = "number",
                  choices: list[str] | None = None) -> bool:
    """True when ``predicted`` means the same answer as ``gold`` (the RL ``r_acc``)."""
    return compare(predicted, gold, answer_type, choices).correct


class VerifyStage:
    """Executor stage ``verify``: sets ``predicted_answer`` and ``verification``.

    Wrong answers stay (the filter decides; they feed statistics); an answer that cannot be
    read at all is rejected as ``answer_unparsable``.
    """

    name = "verify"
    schema = "sample"
    scope = "shard"
    requires = ("response", "gold_answer", "answer_type")
    produces = ("verification", "predicted_answer")

    @classmethod
    def from_config(cls, config) -> VerifyStage:
        return cls()

    def run(self, batch: list[dict]) -> list[dict | Reject]:
        return [self._one(record) for record in batch]

    def _one(self, record: dict) -> dict | Reject:
        rid, source = record.get("id", "unknown"), record.get("source")
        response = record.get("response")
        if not isinstance(response, str) or not response:
            return Reject(rid, self.name, "missing_input", f"record {rid}: field $.response is "
                          "missing; run the anchor stage first", field="$.response", source=source)
        predicted = extract_answer(response)
        if predicted is None:
            return Reject(rid, self.name, "answer_unparsable", f"record {rid}: field $.response has "
                          "no non-empty <answer>...</answer>", field="$.response", source=source)
        verdict = compare(predicted, record["gold_answer"], record.get("answer_type", "text"),
                          record.get("choices"))
        if not verdict.parsed:
            return Reject(rid, self.name, "answer_unparsable",
                          f"record {rid}: field $.response: answer {predicted[:200]!r} cannot be read "
                          f"as a {record.get('answer_type')} answer", field="$.response", source=source)
        out = dict(record)
        out["predicted_answer"] = predicted
        out["verification"] = {"correct": verdict.correct, "method": verdict.method,
                               "gold": record["gold_answer"], "predicted": predicted}
        out["updated_at"] = utcnow()
        return out
