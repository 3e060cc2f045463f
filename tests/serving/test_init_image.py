"""The init image is decoded safely: strict base64, a size cap, three formats, no decompression bombs,
EXIF orientation applied, RGB, and a servable size."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sd_lambda.serving.errors import ApiError
from sd_lambda.serving.init_image import (
    decode_init_image,
    fit_to,
    start_image_size,
)
from sd_lambda.serving.request import INIT_IMAGE_PIXELS_PER_BUDGET, parse_request
from sd_lambda.settings import Settings

from .conftest import encoded, gradient, noise, png_claiming

SETTINGS = Settings()


def refusal(text: str, settings: Settings = SETTINGS) -> ApiError:
    with pytest.raises(ApiError) as raised:
        decode_init_image(text, settings)
    assert raised.value.field == "init_image"
    return raised.value


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "L"), ("WEBP", "RGB")])
def test_png_jpeg_and_webp_decode_to_rgb(fmt: str, mode: str) -> None:
    image = decode_init_image(encoded(gradient(mode=mode), fmt), SETTINGS)
    assert (image.mode, image.size) == ("RGB", (32, 16))


def test_a_data_url_prefix_is_accepted() -> None:
    image = decode_init_image("data:image/png;base64," + encoded(gradient(), "PNG"), SETTINGS)
    assert image.size == (32, 16)


def test_exif_orientation_is_applied() -> None:
    source = gradient(32, 16)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image = decode_init_image(encoded(source, "JPEG", exif=exif, quality=95), SETTINGS)
    assert image.size == (16, 32)
    upright = np.asarray(source.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - upright).mean() < 4  # JPEG's loss, not a rotation


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("%%%not-base64", "invalid_base64"),
        ("aGVsbG8", "invalid_base64"),  # missing padding
        ("aGVs\nbG8=", "invalid_base64"),  # a line break
        ("", "empty"),
        (base64.b64encode(b"hello, not an image").decode(), "invalid_image"),
        (encoded(noise(), "PNG")[:800], "invalid_image"),  # truncated after a valid header
    ],
)
def test_bad_bytes_get_specific_codes(text: str, code: str) -> None:
    error = refusal(text)
    assert (error.status, error.code) == (400, code)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_naming_what_they_are(fmt: str) -> None:
    error = refusal(encoded(gradient(), fmt))
    assert (error.status, error.code) == (400, "invalid_image")
    assert f"it is {fmt}" in error.message
    assert "PNG, JPEG or WebP" in error.message


def test_an_image_over_the_byte_limit_is_413() -> None:
    settings = Settings(max_init_image_bytes=2048)
    error = refusal(encoded(noise(), "PNG"), settings)
    assert (error.status, error.code) == (413, "init_image_too_large")
    assert "SD_MAX_INIT_IMAGE_BYTES" in error.message


def test_a_canvas_over_our_pixel_cap_is_refused_before_decoding() -> None:
    side = int((SETTINGS.max_pixels * INIT_IMAGE_PIXELS_PER_BUDGET) ** 0.5) + 8
    error = refusal(png_claiming(side, side))
    assert (error.status, error.code) == (400, "init_image_too_many_pixels")
    assert f"{side}x{side}" in error.message


def test_a_decompression_bomb_past_pillows_own_guard_is_refused() -> None:
    # 40,000² is past twice Image.MAX_IMAGE_PIXELS: Pillow itself refuses it while reading the header.
    assert 2 * Image.MAX_IMAGE_PIXELS < 40_000**2
    settings = Settings(max_side=1024, max_pixels=10**9)  # so our own cap would let it through
    error = refusal(png_claiming(40_000, 40_000), settings)
    assert (error.status, error.code) == (400, "init_image_too_many_pixels")


def request(**fields: Any) -> Any:
    return parse_request({"prompt": "x", "init_image": "AAAA", **fields}, SETTINGS)


def test_the_size_is_the_requests_when_it_gives_both() -> None:
    assert start_image_size(gradient(300, 200), request(width=64, height=128), SETTINGS) == (64, 128)
    assert fit_to(gradient(300, 200), 64, 128).size == (64, 128)


def test_one_side_given_keeps_the_aspect_ratio_in_multiples_of_8() -> None:
    assert start_image_size(gradient(300, 200), request(width=240), SETTINGS) == (240, 160)
    assert start_image_size(gradient(300, 200), request(height=96), SETTINGS) == (144, 96)


def test_no_size_given_keeps_the_images_within_the_limits() -> None:
    assert start_image_size(gradient(300, 201), request(), SETTINGS) == (296, 200)
    width, height = start_image_size(gradient(4000, 3000), request(), SETTINGS)
    assert width % 8 == height % 8 == 0
    assert width <= SETTINGS.max_side
    assert width * height <= SETTINGS.max_pixels
    assert abs(width / height - 4 / 3) < 0.02
    assert start_image_size(gradient(3, 2), request(), SETTINGS) == (8, 8)
