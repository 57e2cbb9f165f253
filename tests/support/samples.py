"""Hand-made sample records of the full synthesized shape (filter, publish and card tests).

Each record passes ``pipeline.records.validate_sample(stage="vas")``: small PNG images, the three
teacher stages with provenance, an anchored response, verification and VAS.
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image, ImageDraw

from pipeline.ids import sample_id
from pipeline.images import encode_png
from pipeline.synthesis.anchors import find_anchors

COLORS = ((220, 30, 30), (30, 170, 60), (40, 60, 220), (230, 180, 20))
PROMPT_SHA = {"describe": "a" * 64, "reason": "b" * 64, "anchor": "c" * 64}


def png(index: int, size: int = 24) -> bytes:
    img = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle((2, 2, size - 3, size - 3), outline=COLORS[index % 4], width=2)
    draw.text((4, 4), str(index % 100), fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image(blob: bytes, size: int = 24) -> dict:
    return {"bytes": blob, "sha256": hashlib.sha256(blob).hexdigest(), "width": size, "height": size,
            "format": "PNG", "path": None}


def stage(name: str, text: str, backend: str = "openai", model: str = "teacher-x", cached: bool = False,
          prompt_tokens: int = 100, completion_tokens: int = 50) -> dict:
    return {"text": text, "teacher": {"backend": backend, "model": model},
            "prompt": {"name": name, "version": "1", "sha256": PROMPT_SHA[name]},
            "sampling": {"temperature": 0.7}, "cached": cached,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            "finished_at": "2026-11-25T12:00:00Z"}


def make_record(i: int, *, correct: bool = True, vas: float | None = None, n_images: int = 1,
                question: str | None = None, response: str | None = None, programmatic: bool = False,
                source: str = "procedural/geometry", image_seed: int | None = None) -> dict:
    blobs = [png((image_seed if image_seed is not None else i) * 7 + k) for k in range(n_images)]
    question = question or f"Problem {i}: what is the angle at vertex B of triangle {i}?"
    answer = str(30 + i)
    response = response or (f"<think>Look back at the image: the triangle has a mark at B. The sum of angles "
                            f"is 180, so B = {answer}. Check the image again: the mark agrees."
                            f"</think><answer>{answer}</answer>")
    backend = "programmatic" if programmatic else "openai"
    anchors = find_anchors(response)
    raw = 2.0 + i if vas is None else vas
    return {
        "id": sample_id(blobs, question, source),
        "images": [image(b) for b in blobs],
        "question": question, "gold_answer": answer, "answer_type": "number", "choices": None,
        "source": source, "difficulty": 2, "scene": None,
        "stages": {"describe": stage("describe", "A triangle ABC.", backend, "describer-1"),
                   "reason": stage("reason", "B is 30.", backend, "reasoner-2", prompt_tokens=200, completion_tokens=400),
                   "anchor": stage("anchor", response, backend, "anchorer-3", cached=i % 2 == 0)},
        "response": response, "predicted_answer": answer if correct else "999",
        "anchors": anchors, "n_anchors": len(anchors),
        "verification": {"correct": correct, "method": "math_verify", "gold": answer,
                         "predicted": answer if correct else "999"},
        "vas": {"raw": raw, "normalized": raw / 4.0, "model": "tiny-qwen2.5-vl", "queries": "response",
                "n_image_tokens": 16, "n_system_tokens": 4, "max_pixels": 262144, "layers": None},
        "programmatic": programmatic,
        "created_at": "2026-11-25T12:00:00Z", "updated_at": f"2026-11-25T12:{i % 60:02d}:00Z",
    }


def make_records(n: int, **kwargs) -> list[dict]:
    return [make_record(i, **kwargs) for i in range(n)]


def seed_record(**over):
    """A minimal valid seed record (one 8x6 white PNG); keyword arguments override fields."""
    png = encode_png(Image.new("RGB", (8, 6), "white"))
    rec = {
        "id": sample_id([png], "What is x?", "unit"),
        "images": [{"bytes": png, "sha256": hashlib.sha256(png).hexdigest(), "width": 8,
                    "height": 6, "format": "PNG", "path": None}],
        "question": "What is x?", "gold_answer": "42", "answer_type": "number", "source": "unit",
    }
    rec.update(over)
    return rec


def validate_sample(record: dict, stage: str | None = None) -> None:
    """The records contract after ``stage``: the sample schema plus the fields it produces."""
    from pipeline.plan import DEFAULT_PLAN
    from pipeline.records import validate_output

    validate_output("sample", record, DEFAULT_PLAN.get(stage).produces if stage else (), stage)


def teacher_stage(name: str, config=None, **kwargs):
    """The teacher stage class of the default pipeline named ``name``, built with these arguments."""
    from pipeline.plan import DEFAULT_PLAN

    return DEFAULT_PLAN.get(name)(config, **kwargs)
