"""VLLMTeacher without vLLM: the lazy-import error, and the batching logic over a stand-in engine.

vLLM needs a GPU; here a minimal stand-in module with the same ``LLM.chat``/``SamplingParams``
surface checks what this backend itself does (chunking, ordering, on_result, finish reasons,
image parts, failure isolation). The engine's own behaviour is vLLM's to test.
"""

from __future__ import annotations

import asyncio
import io
import sys
import types
from dataclasses import dataclass, field

import pytest
from PIL import Image

from pipeline.synthesis.teachers.base import (
    TeacherConfig,
    TeacherError,
    TeacherRequest,
    TeacherResponse,
)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG")
    return buf.getvalue()


def request(tag: str, images=None, **sampling) -> TeacherRequest:
    images = [png(40, 30)] if images is None else images
    parts = [{"type": "image", "index": i} for i in range(len(images))]
    return TeacherRequest(key=f"key-{tag}", stage="reason",
                          messages=[{"role": "system", "content": "sys"},
                                    {"role": "user", "content": [*parts, {"type": "text", "text": tag}]}],
                          images=images, sampling={"max_tokens": 32, **sampling}, record={})


@dataclass
class FakeCompletion:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class FakeOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]


@dataclass
class FakeLLM:
    model: str
    calls: list[int] = field(default_factory=list)
    images_seen: list[tuple[int, int]] = field(default_factory=list)

    def chat(self, conversations, sampling_params, use_tqdm=True):
        self.calls.append(len(conversations))
        outputs = []
        for conversation, params in zip(conversations, sampling_params, strict=True):
            text = conversation[-1]["content"][-1]["text"]
            if text == "too-long":
                raise ValueError("prompt longer than max_model_len")
            for part in conversation[-1]["content"]:
                if part["type"] == "image_pil":
                    self.images_seen.append(part["image_pil"].size)
            finish = "length" if text == "cut" else "stop"
            outputs.append(FakeOutput([1] * 10, [FakeCompletion(f"answer to {text} t={params['temperature']}",
                                                                [2] * 4, finish)]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: {"temperature": 1.0, **kw}
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_missing_vllm_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    from pipeline.synthesis.teachers import build_teacher
    with pytest.raises(ImportError, match=r"needs vLLM.*\.\[gpu\]"):
        build_teacher(TeacherConfig(backend="vllm", model="some/model"))


def test_batches_in_chunks_in_order_with_on_result(fake_vllm):
    from pipeline.synthesis.teachers.vllm_backend import VLLMTeacher
    teacher = VLLMTeacher(TeacherConfig(backend="vllm", model="m", max_concurrency=3, max_pixels=600))
    requests = [request(str(i), temperature=0.5) for i in range(7)] + [request("cut")]
    seen = []
    results = asyncio.run(teacher.agenerate(requests, on_result=lambda i, r: seen.append(i)))
    assert teacher._llm.calls == [3, 3, 2]
    assert sorted(seen) == list(range(8))
    for i in range(7):
        assert isinstance(results[i], TeacherResponse)
        assert results[i].text == f"answer to {i} t=0.5"
        assert (results[i].prompt_tokens, results[i].completion_tokens) == (10, 4)
    assert isinstance(results[7], TeacherError) and results[7].reason == "teacher_truncated"
    assert all(w * h <= 600 for w, h in teacher._llm.images_seen)  # 40x30 = 1200 downscaled


def test_one_bad_request_does_not_sink_its_chunk(fake_vllm):
    from pipeline.synthesis.teachers.vllm_backend import VLLMTeacher
    teacher = VLLMTeacher(TeacherConfig(backend="vllm", model="m", max_concurrency=8))
    corrupt = request("corrupt", images=[b"not an image"])
    results = asyncio.run(teacher.agenerate([request("a"), request("too-long"), corrupt, request("b")]))
    assert isinstance(results[0], TeacherResponse) and isinstance(results[3], TeacherResponse)
    assert isinstance(results[1], TeacherError) and results[1].reason == "teacher_failed"
    assert "max_model_len" in results[1].message
    assert isinstance(results[2], TeacherError) and results[2].reason == "image_not_an_image"


def test_sampling_keys_are_checked(fake_vllm):
    from pipeline.synthesis.teachers.vllm_backend import sampling_kwargs
    assert sampling_kwargs(request("a", top_k=20, seed=3)) == {"max_tokens": 32, "top_k": 20, "seed": 3}
    with pytest.raises(ValueError, match=r"request key-a: sampling keys \['logit_bias'\]"):
        sampling_kwargs(request("a", logit_bias={}))
