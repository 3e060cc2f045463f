"""Image bytes that fit in one Lambda response.

A synchronous Lambda response (and so a function URL body) is capped at 6 MB, counted over the whole
JSON document the function returns, and the image travels base64-encoded inside that JSON envelope
(https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html, "Invocation payload").
When the requested encoding would not fit, fall back to JPEG (far smaller for photographic content);
when even that does not fit, refuse with 413 and say why.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from sd_lambda.engine.generation import MEDIA_TYPES
from sd_lambda.serving.errors import ApiError

# Room for the JSON envelope and headers around the base64 body.
ENVELOPE_BYTES = 8 * 1024
FALLBACK_FORMAT = "jpeg"
FALLBACK_QUALITY = 85


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
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


def response_size(raw_bytes: int) -> int:
    """Bytes the image takes in a response: base64 of it plus the envelope."""
    return 4 * ((raw_bytes + 2) // 3) + ENVELOPE_BYTES


def encode_within(
    image: Image.Image, output_format: str, quality: int, max_response_bytes: int
) -> EncodedImage:
    """Encode as requested, or as the JPEG fallback, so the response stays under ``max_response_bytes``."""
    data = encode(image, output_format, quality)
    if response_size(len(data)) <= max_response_bytes:
        return EncodedImage(data, output_format)
    fallback = encode(image, FALLBACK_FORMAT, min(quality, FALLBACK_QUALITY))
    if response_size(len(fallback)) <= max_response_bytes:
        return EncodedImage(fallback, FALLBACK_FORMAT, fallback_from=output_format)
    raise ApiError(
        413,
        "response_too_large",
        f"the {image.width}x{image.height} image is {len(data)} bytes as {output_format} and "
        f"{len(fallback)} as {FALLBACK_FORMAT}; base64-encoded that exceeds the response limit of "
        f"{max_response_bytes} bytes (Lambda allows 6 MB): request a smaller width/height or a lower quality",
    )
