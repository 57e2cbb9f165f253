"""Visual Attention Score (SPEC "VAS"): per-sample response VAS and model-level VAS.

* **response VAS** (**ours**, the filter's score): queries ``R``, one teacher-forced forward of
  the reference model over (images, question, synthesized answer);
* **model-level VAS** (the paper's): queries ``U``, prefill only, averaged over a probe set.

Both report the raw score and the size-normalised one (raw divided by ``|I| / |S|``), the token
counts, the layers, ``max_pixels`` (keep it fixed within a dataset: raw VAS grows with the
number of image tokens) and the ``system_prompt`` written into every chat (explicitly, for every
model family: the S of the ratio). Samples are scored in batches sorted by length (padding changes no
score: the lens is exact per row). Samples that cannot be scored are never dropped:

=========================  ==================================================================
``vas_no_system_tokens``   the chat has no system span (``|S| = 0``): the ratio is undefined
``vas_no_image_tokens``    no image token reached the model (``|I| = 0``)
``vas_no_query_tokens``    empty question/response span
``missing_field``          a record without ``question`` / ``response`` / ``images``
image reason codes         from :mod:`pipeline.images` (``image_corrupt``, ...)
=========================  ==================================================================

:class:`VASStage` (name ``"vas"``) adds ``record["vas"]`` in the work store, or rejects with the
codes above; ``python -m pipeline.vas`` scores a work-store stage or a parquet/HF dataset folder.

This module is light (no torch): the scoring itself is :mod:`pipeline.vas.scoring`, imported
when a stage first runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.images import ImageError, pil_images
from pipeline.paper import DEFAULT_SYSTEM_PROMPT, EPS

DEFAULT_EPS = EPS


@dataclass
class VASConfig:
    """How response VAS is computed (SPEC "VAS"; stage ``vas`` of the synthesis run)."""

    model: str = field(default="Qwen/Qwen2.5-VL-7B-Instruct", metadata={
        "help": "Reference model (hub id or local folder) of a supported family (Qwen2-VL, Qwen2.5-VL, "
                "Qwen3-VL dense or MoE, Gemma 3); 'tiny' (or 'tiny-qwen3-vl', 'tiny-qwen3-vl-moe', "
                "'tiny-gemma3') = a built-in random tiny model (tests and demo only: its scores mean nothing)."})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={
        "help": "System turn written explicitly into every scored chat (VAS divides by its attention "
                "mass; families whose template has no default system turn get it the same way). "
                "Recorded in every VAS row; keep it fixed to compare scores."})
    queries: Literal["user", "response"] = field(default="response", metadata={
        "help": "Query tokens: 'response' = the synthesized answer (per-sample filter score), "
                "'user' = the question (the paper's model-level VAS, prefill only)."})
    layers: list[int] | None = field(default=None, metadata={
        "help": "Decoder layers averaged over (negative from the end); null = all layers (paper)."})
    batch_size: int = field(default=4, metadata={"volatile": True, "help": "Samples per forward pass (sorted by length)."})
    max_pixels: int | None = field(default=262144, metadata={
        "help": "Image resize cap in pixels, fixed for the whole dataset so raw VAS stays comparable "
                "(reference SFT config: 262144); null = the processor's default."})
    eps: float = field(default=DEFAULT_EPS, metadata={"help": "eps in sum_I A / (sum_S A + eps)."})
    dtype: str = field(default="auto", metadata={
        "help": "Model dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32."})
    device: str | None = field(default=None, metadata={"volatile": True, "help": "Torch device; null = cuda when available, else cpu."})
    progress: bool = field(default=True, metadata={"volatile": True, "help": "Show a progress bar."})
    controls: list[str] = field(default_factory=list, metadata={
        "help": "Negative controls scored beside every sample and never published "
                "(pipeline.synthesis.controls): wrong_claims (visual claims wrong for the image), "
                "text_only (never refers to the image), blank_image (the image blanked). The run "
                "report and the card give how well each VAS view separates real samples from them (AUC)."})

    def __post_init__(self):
        if self.queries not in ("user", "response"):
            raise ValueError(f"vas.queries: expected 'user' or 'response', got {self.queries!r}")
        if self.batch_size < 1:
            raise ValueError(f"vas.batch_size: must be >= 1, got {self.batch_size}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"vas.max_pixels: must be a positive number of pixels or null, got {self.max_pixels}")
        if not isinstance(self.system_prompt, str) or not self.system_prompt.strip():
            raise ValueError(f"vas.system_prompt: must be a non-empty string, got {self.system_prompt!r}")
        from pipeline.synthesis.controls import check_kinds
        try:
            self.controls = check_kinds(self.controls)
        except ValueError as err:
            raise ValueError(f"vas.controls: {err}") from None
        if self.controls and self.queries != "response":
            raise ValueError("vas.controls: controls change the response; they need vas.queries: response")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"vas.dtype: expected auto|bfloat16|float16|float32, got {self.dtype!r}")


@dataclass
class VASItem:
    """One sample to score: decoded images, question and (for response VAS) the answer."""

    key: str
    images: list
    question: str
    response: str | None = None


class ScoreError(ValueError):
    def __init__(self, reason: str, message: str, field: str | None = None):
        self.reason, self.message, self.field = reason, message, field
        super().__init__(f"{reason}: {message}")



def item_from_record(record: dict, queries: str) -> VASItem:
    """The scoring input of a sample record; :class:`ScoreError` when it lacks what is needed."""
    rid = record.get("id") or "<no id>"
    question = record.get("question")
    if not isinstance(question, str) or not question:
        raise ScoreError("missing_field", f"record {rid} has no question", "$.question")
    response = record.get("response")
    if queries == "response" and (not isinstance(response, str) or not response):
        raise ScoreError("missing_field", f"record {rid} has no response to score", "$.response")
    if not record.get("images"):
        raise ScoreError("missing_field", f"record {rid} has no images", "$.images")
    try:
        images = pil_images(record)
    except ImageError as err:
        raise ScoreError(err.reason, f"record {rid}: {err.message}", "$.images") from None
    return VASItem(key=rid, images=images, question=question, response=response)

