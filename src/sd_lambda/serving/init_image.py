"""The image an image-to-image request starts from: base64 in, a safe RGB image of a servable size out.

Everything here treats the bytes as hostile: the base64 is checked strictly, the decoded size is
capped (``SD_MAX_INIT_IMAGE_BYTES``), only PNG, JPEG and WebP are opened (Pillow's ``formats=``), and
the pixel count the header claims is checked before a single pixel is decoded, so a decompression bomb
(a small file claiming a huge canvas) is refused without the memory it asks for. Pillow's own bomb
guard (``Image.MAX_IMAGE_PIXELS``) stays on behind ours.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from sd_lambda.serving.errors import ApiError
from sd_lambda.serving.request import INIT_IMAGE_PIXELS_PER_BUDGET, GenerationRequest
from sd_lambda.settings import Settings, base64_size

FIELD = "init_image"
# Pillow format names opened; every other format (GIF, BMP, TIFF, ...) is refused before decoding.
FORMATS = ("PNG", "JPEG", "WEBP")
SIDE_STEP = 8  # the VAE halves the size three times
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")


def decode_init_image(text: str, settings: Settings) -> Image.Image:
    """``text`` (base64, optionally a data URL) as an RGB image, upright per its EXIF orientation."""
    data = _decode_base64(text, settings.max_init_image_bytes)
    limit = settings.max_pixels * INIT_IMAGE_PIXELS_PER_BUDGET
    try:
        with warnings.catch_warnings():
            # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that; a warning is a refusal here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > limit:
                raise _too_many_pixels(f"{width}x{height} ({width * height} pixels)", limit)
            image.load()
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels("a decompression bomb (its header claims a huge canvas)", limit) from None
    except UnidentifiedImageError:
        raise ApiError(
            400,
            "invalid_image",
            f"{FIELD} is not a PNG, JPEG or WebP image ({_sniff(data)}); send one of those, base64-encoded",
            FIELD,
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data behind a valid header
        raise ApiError(400, "invalid_image", f"{FIELD} cannot be decoded: {exc}", FIELD) from None


def start_image_size(image: Image.Image, request: GenerationRequest, settings: Settings) -> tuple[int, int]:
    """The size to generate at: the request's width and height; one given keeps the image's aspect
    ratio; neither: the image's own size, scaled down within SD_MAX_SIDE and SD_MAX_PIXELS. Always a
    multiple of 8."""
    width, height = request.width, request.height
    if width is not None and height is not None:
        return width, height
    aspect = image.width / image.height
    if width is not None:
        return width, _within_side(width / aspect, settings)
    if height is not None:
        return _within_side(height * aspect, settings), height
    scale = min(
        1.0,
        settings.max_side / image.width,
        settings.max_side / image.height,
        math.sqrt(settings.max_pixels / (image.width * image.height)),
    )
    return _floor_step(image.width * scale), _floor_step(image.height * scale)


def fit_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` resized to exactly ``width`` x ``height`` (stretched when the aspect ratio differs,
    as diffusers' own preprocessing does)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _within_side(side: float, settings: Settings) -> int:
    return min(_floor_step(side), settings.max_side - settings.max_side % SIDE_STEP)


def _floor_step(side: float) -> int:
    return max(SIDE_STEP, int(side) // SIDE_STEP * SIDE_STEP)


def _decode_base64(text: str, limit: int) -> bytes:
    prefix = _DATA_URL.match(text)
    payload = text[prefix.end() :] if prefix else text
    # The encoded length bounds the decoded one: refuse before allocating the decoded bytes.
    if len(payload) > base64_size(limit) + 4:
        raise _too_large(len(payload) * 3 // 4, limit)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400,
            "invalid_base64",
            f"{FIELD} is not valid base64 (standard alphabet, with padding; no line breaks)",
            FIELD,
        ) from None
    if len(data) > limit:
        raise _too_large(len(data), limit)
    if not data:
        raise ApiError(400, "empty", f"{FIELD} must not be empty", FIELD)
    return data


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        "init_image_too_large",
        f"{FIELD} is about {size} bytes; the limit is {limit} (SD_MAX_INIT_IMAGE_BYTES): send a smaller "
        "or more compressed image (JPEG or WebP)",
        FIELD,
    )


def _too_many_pixels(what: str, limit: int) -> ApiError:
    return ApiError(
        400,
        "init_image_too_many_pixels",
        f"{FIELD} is {what}; at most {limit} pixels are read "
        f"({INIT_IMAGE_PIXELS_PER_BUDGET} x SD_MAX_PIXELS): scale it down first",
        FIELD,
    )


def _sniff(data: bytes) -> str:
    """What the bytes look like, for the error message."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return f"it is {image.format}"
    except Exception:  # only a message depends on it: whatever a header parser raises means "unknown"
        return "not an image Pillow recognises"
