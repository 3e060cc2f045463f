"""Image bytes that fit in one Lambda response.

A synchronous Lambda response (and so a function URL body) is capped at 6 MB, counted over the whole
JSON document the function returns, and the image travels base64-encoded inside that JSON envelope
(https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html, "Invocation payload").
When the requested encoding would not fit, fall back to JPEG for every image of the response (far
smaller for photographic content); when even that does not fit, refuse with 413 and say why. Before
generating, ``check_fits`` refuses a request whose images could not fit even at their least size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from sd_lambda.engine.generation import MEDIA_TYPES
from sd_lambda.serving.errors import ApiError
from sd_lambda.settings import base64_size

# Room for the JSON envelope and headers around the base64 bodies, and for each image's own entry
# ({"image": ..., "seed": ...}).
ENVELOPE_BYTES = 8 * 1024
IMAGE_ENTRY_BYTES = 64
FALLBACK_FORMAT = "jpeg"
FALLBACK_QUALITY = 85
# The least a generated image plausibly takes per pixel in each encoding (a smooth, low-detail image
# comes near it). The check before generating refuses only what cannot fit even then; the encoded size
# is the real check.
LEAST_BYTES_PER_PIXEL = {"png": 1.0, "jpeg": 0.15, "webp": 0.1}


@dataclass(frozen=True)
class EncodedImages:
    """The images of one response, all in one encoding."""

    data: tuple[bytes, ...]
    format: str
    fallback_from: str | None = None  # the requested format, when a fallback was used

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


def encode(image: Image.Image, output_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()


def response_size(*raw_bytes: int) -> int:
    """Bytes images of these sizes take in a response: base64 of each, its entry, and the envelope."""
    return sum(base64_size(size) + IMAGE_ENTRY_BYTES for size in raw_bytes) + ENVELOPE_BYTES


def check_fits(
    width: int, height: int, count: int, output_format: str, quality: int, max_response_bytes: int
) -> None:
    """Before generating: a 413 when ``count`` images of this size cannot fit even at the least an
    encoding takes (the requested one or the fallback)."""
    least = min(LEAST_BYTES_PER_PIXEL[output_format], LEAST_BYTES_PER_PIXEL[FALLBACK_FORMAT])
    estimate = int(width * height * least)
    if response_size(*[estimate] * count) > max_response_bytes:
        raise ApiError(
            413,
            "response_too_large",
            f"{count} images of {width}x{height} need at least about {estimate} bytes each, over the "
            f"response limit of {max_response_bytes} bytes once base64-encoded (Lambda allows 6 MB): "
            "request fewer images (num_images) or a smaller width/height",
            "num_images" if count > 1 else "width",
        )


def encode_within(
    images: list[Image.Image], output_format: str, quality: int, max_response_bytes: int
) -> EncodedImages:
    """Encode every image as requested, or all as the JPEG fallback, so the response stays under
    ``max_response_bytes``."""
    data = tuple(encode(image, output_format, quality) for image in images)
    if response_size(*map(len, data)) <= max_response_bytes:
        return EncodedImages(data, output_format)
    fallback = tuple(encode(image, FALLBACK_FORMAT, min(quality, FALLBACK_QUALITY)) for image in images)
    if response_size(*map(len, fallback)) <= max_response_bytes:
        return EncodedImages(fallback, FALLBACK_FORMAT, fallback_from=output_format)
    first = images[0]
    count = f"{len(images)} images" if len(images) > 1 else "image"
    raise ApiError(
        413,
        "response_too_large",
        f"the {first.width}x{first.height} {count} take {sum(map(len, data))} bytes as {output_format} "
        f"and {sum(map(len, fallback))} as {FALLBACK_FORMAT}; base64-encoded that exceeds the response "
        f"limit of {max_response_bytes} bytes (Lambda allows 6 MB): request fewer images, a smaller "
        "width/height or a lower quality",
    )
