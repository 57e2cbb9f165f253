import base64
import io

import pytest
from PIL import Image

from pipeline.images import ImageError, fit_max_pixels, image_record, open_image, to_data_url


def png(w=40, h=30, color="red"):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_record_describes_the_image():
    data = png(40, 30)
    rec = image_record(data, path="a.png")
    assert (rec["width"], rec["height"], rec["format"], rec["path"]) == (40, 30, "PNG", "a.png")
    assert rec["bytes"] == data and len(rec["sha256"]) == 64


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "image_empty"),
    (b"this is not an image at all", "image_not_an_image"),
    (png()[:60], "image_corrupt"),
])
def test_bad_images_have_reason_codes(data, reason):
    with pytest.raises(ImageError) as exc:
        image_record(data)
    assert exc.value.reason == reason


def test_oversized_image_is_refused_before_decoding():
    big = png(400, 300)
    with pytest.raises(ImageError) as exc:
        open_image(big, max_pixels=100_000)
    assert exc.value.reason == "image_too_large" and "400x300" in exc.value.message


def test_fit_max_pixels_downscales_only():
    img = Image.new("RGB", (1000, 500))
    small = fit_max_pixels(img, 50_000)
    assert small.width * small.height <= 50_000 and abs(small.width / small.height - 2) < 0.05
    assert fit_max_pixels(img, 10**7) is img


def test_data_url_resizes_to_max_pixels():
    url = to_data_url(png(400, 400), max_pixels=10_000)
    header, b64 = url.split(",", 1)
    assert header == "data:image/png;base64"
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.width * img.height <= 10_000
