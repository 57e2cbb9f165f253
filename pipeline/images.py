"""Image intake: decode safely, describe, resize for teachers.

Every image entering the pipeline goes through :func:`image_record`, which refuses corrupt,
truncated, empty, non-image and oversized files (decompression bombs) with an :class:`ImageError`
carrying a reason code, so callers turn it into a reject.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_SOURCE_PIXELS = 40_000_000  # refuse bigger images: a 100-MP PNG is a bomb, not data


class ImageError(ValueError):
    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message
        super().__init__(f"{reason}: {message}")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_SOURCE_PIXELS) -> Image.Image:
    """Decode fully (catches truncation), checking the pixel count before decoding."""
    if not data:
        raise ImageError("image_empty", "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageError("image_too_large",
                                 f"{img.width}x{img.height} exceeds max {max_pixels} pixels")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("image_too_large", str(e)) from None
    except UnidentifiedImageError:
        raise ImageError("image_not_an_image", "bytes are not a decodable image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError("image_corrupt", f"decode failed: {e}") from None
    return img


def image_record(data: bytes, path: str | None = None,
                 max_pixels: int = DEFAULT_MAX_SOURCE_PIXELS) -> dict:
    """The contract form of one image (schemas/seed.schema.json#/$defs/image)."""
    img = open_image(data, max_pixels)
    return {"bytes": bytes(data), "sha256": hashlib.sha256(data).hexdigest(),
            "width": img.width, "height": img.height, "format": (img.format or "PNG").upper(),
            "path": path}


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def fit_max_pixels(img: Image.Image, max_pixels: int | None) -> Image.Image:
    """Downscale (aspect kept) so that width*height <= max_pixels; never upscales."""
    if not max_pixels or img.width * img.height <= max_pixels:
        return img
    scale = (max_pixels / (img.width * img.height)) ** 0.5
    size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def to_data_url(data: bytes, max_pixels: int | None = None) -> str:
    """Base64 data URL for OpenAI-compatible chat APIs, resized to ``max_pixels``."""
    img = open_image(data)
    resized = fit_max_pixels(img, max_pixels)
    if resized is img and (img.format or "").upper() in ("PNG", "JPEG"):
        blob, mime = data, f"image/{img.format.lower()}"
    else:
        blob, mime = encode_png(resized.convert("RGB") if resized.mode not in ("RGB", "RGBA", "L") else resized), "image/png"
    return f"data:{mime};base64,{base64.b64encode(blob).decode('ascii')}"


def pil_images(record: dict) -> list[Image.Image]:
    """Decoded RGB images of a seed/sample record."""
    return [open_image(im["bytes"]).convert("RGB") for im in record["images"]]


def image_cell(item: Any, base: Path | None = None) -> tuple[bytes, str | None]:
    """``(encoded bytes, path or None)`` of one dataset image cell, whatever shape it has:
    bytes, ``{"bytes", "path"}`` (Hugging Face ``Image`` with decoding off), a path (relative
    paths resolved against ``base``) or a decoded PIL image (encoded as PNG).

    Raises :class:`ImageError` (``field_missing``, ``schema_invalid``, ``image_missing``).
    """
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return bytes(item["bytes"]), item.get("path")
        if item.get("path"):
            return _read_path(str(item["path"]), base), str(item["path"])
        raise ImageError("field_missing", "image entry has neither bytes nor a path")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item), None
    if isinstance(item, (str, os.PathLike)):
        return _read_path(os.fspath(item), base), os.fspath(item)
    if isinstance(item, Image.Image):
        return encode_png(item), None
    raise ImageError("schema_invalid",
                     f"expected image bytes, a path or an {{bytes, path}} dict, got {type(item).__name__}")


def image_cells(value: Any, base: Path | None = None) -> list[bytes]:
    """Encoded bytes of a cell holding one image or a list of them (None: no image)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [image_cell(item, base)[0] for item in items]


def _read_path(raw: str, base: Path | None) -> bytes:
    path = Path(raw).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError("image_missing", f"file {path} does not exist") from None
    except OSError as err:
        raise ImageError("image_missing", f"cannot read {path}: {err.strerror or err}") from None
