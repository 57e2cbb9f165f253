"""Teacher over vLLM's offline engine (``vllm.LLM.chat``): one process, batched, no HTTP.

vLLM is imported lazily, in the constructor, so the CPU install never needs it (the ``gpu`` extra
provides it). Requests are sent in chunks of ``config.max_concurrency`` conversations per
``LLM.chat`` call (set it to a few hundred: vLLM batches inside a call), and ``on_result`` fires
after each chunk, so a crash loses at most one chunk. Images go in as PIL images
(``{"type": "image_pil", ...}`` parts), resized to ``config.max_pixels`` like the HTTP backend.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pipeline.images import ImageError, fit_max_pixels, open_image
from pipeline.synthesis.teachers.base import (
    OnResult,
    Teacher,
    TeacherConfig,
    TeacherError,
    TeacherRequest,
    TeacherResponse,
    replace_image_parts,
)

log = logging.getLogger(__name__)

# request.sampling key -> vllm.SamplingParams argument
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "min_p": "min_p", "max_tokens": "max_tokens", "seed": "seed", "stop": "stop",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                 "repetition_penalty": "repetition_penalty", "n": "n"}
INSTALL_HINT = ("the vllm teacher backend needs vLLM, which is not installed: "
                "pip install -e '.[gpu]' on a CUDA machine, or use teacher.backend: openai "
                "against a `vllm serve` endpoint")


def sampling_kwargs(request: TeacherRequest) -> dict[str, Any]:
    """``request.sampling`` as ``vllm.SamplingParams`` keyword arguments (unknown keys refused)."""
    unknown = sorted(set(request.sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"request {request.key}: sampling keys {unknown} are not supported by "
                         f"the vllm backend (known: {sorted(SAMPLING_KEYS)})")
    if request.sampling.get("n", 1) != 1:
        raise ValueError(f"request {request.key}: sampling.n must be 1, got {request.sampling['n']!r}")
    return {SAMPLING_KEYS[k]: v for k, v in request.sampling.items()}


def build_conversation(request: TeacherRequest, max_pixels: int | None) -> list[dict]:
    """``request.messages`` with each ``{"type": "image", "index": i}`` part as a PIL image part."""
    return replace_image_parts(request, lambda image: {
        "type": "image_pil", "image_pil": fit_max_pixels(open_image(image).convert("RGB"), max_pixels)})


class VLLMTeacher(Teacher):
    """Same interface as the HTTP teacher; the model is loaded on the first ``agenerate``."""

    def __init__(self, config: TeacherConfig):
        try:
            import vllm
        except ImportError:
            raise ImportError(INSTALL_HINT) from None
        super().__init__(config)
        self._vllm = vllm
        self._llm: Any = None

    def _engine(self) -> Any:
        if self._llm is None:
            log.info("vllm teacher: loading %s with %s", self.config.model, self.config.vllm_kwargs)
            self._llm = self._vllm.LLM(model=self.config.model, **self.config.vllm_kwargs)
        return self._llm

    async def agenerate(self, requests: list[TeacherRequest],
                        on_result: OnResult | None = None) -> list[TeacherResponse | TeacherError]:
        """One result per request, in order; ``on_result(i, result)`` after each chunk."""
        results: list[TeacherResponse | TeacherError | None] = [None] * len(requests)
        chunk = max(1, self.config.max_concurrency)
        for start in range(0, len(requests), chunk):
            indices = list(range(start, min(start + chunk, len(requests))))
            # the engine call blocks for the whole chunk: keep the event loop responsive
            chunk_results = await asyncio.to_thread(self._generate, [requests[i] for i in indices])
            for i, result in zip(indices, chunk_results, strict=True):
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
        return results  # type: ignore[return-value]

    def _generate(self, requests: list[TeacherRequest]) -> list[TeacherResponse | TeacherError]:
        prepared: list[tuple[int, list[dict], Any]] = []
        results: list[TeacherResponse | TeacherError | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            params = self._vllm.SamplingParams(**sampling_kwargs(request))
            try:
                prepared.append((i, build_conversation(request, self.config.max_pixels), params))
            except ImageError as e:
                results[i] = TeacherError(e.reason, f"request {request.key}: image: {e.message}")
        if prepared:
            try:
                outputs = self._chat(prepared)
            except (ValueError, RuntimeError) as e:
                # one bad request (e.g. longer than max_model_len) fails the whole call: isolate it
                log.warning("vllm teacher: batch of %d failed (%s); retrying one by one",
                            len(prepared), e)
                outputs = [self._chat_one(item) for item in prepared]
            for (i, _, _), output in zip(prepared, outputs, strict=True):
                results[i] = output if isinstance(output, TeacherError) else self._result(output)
        return results  # type: ignore[return-value]

    def _chat(self, prepared: list[tuple[int, list[dict], Any]]) -> list[Any]:
        return self._engine().chat([conv for _, conv, _ in prepared],
                                   sampling_params=[p for _, _, p in prepared], use_tqdm=True)

    def _chat_one(self, item: tuple[int, list[dict], Any]) -> Any:
        try:
            [output] = self._chat([item])
        except (ValueError, RuntimeError) as e:
            return TeacherError("teacher_failed", f"vllm: {type(e).__name__}: {str(e)[:300]}")
        return output

    def _result(self, output: Any) -> TeacherResponse | TeacherError:
        completion = output.outputs[0]
        prompt_tokens = len(output.prompt_token_ids or [])
        completion_tokens = len(completion.token_ids or [])
        if completion.finish_reason == "length":
            error = TeacherError("teacher_truncated", f"hit max_tokens after {completion_tokens} "
                                 "tokens (finish_reason length)")
            error.prompt_tokens, error.completion_tokens = prompt_tokens, completion_tokens  # type: ignore[attr-defined]
            return error
        if not completion.text.strip():
            return TeacherError("teacher_malformed", "empty completion")
        return TeacherResponse(text=completion.text, prompt_tokens=prompt_tokens,
                               completion_tokens=completion_tokens,
                               finish_reason=completion.finish_reason or "stop",
                               model=self.config.model)
