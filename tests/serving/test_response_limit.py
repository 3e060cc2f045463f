"""The 6 MB response guard, held against Lambda's own limit rather than the guard's formula.

Lambda caps a synchronous invocation's response payload at 6 MB, where the docs' MB is 1,024 KB
(https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html, "Invocation payload
(request and response)"): 6,291,456 bytes. The payload is the whole JSON document the function
returns, so an image counts base64-encoded, inside the function URL envelope. The limit below is
written out, not derived from :mod:`sd_lambda.serving.encoding`, so a guard that counts raw bytes fails here.
"""

from __future__ import annotations

import base64
import io
import json
import random

import pytest
from PIL import Image

from sd_lambda.engine.torch_engine import Engine
from sd_lambda.serving.encoding import encode_within
from sd_lambda.settings import Settings

from .conftest import LoggedService, url_event

LAMBDA_RESPONSE_PAYLOAD_LIMIT = 6 * 1024 * 1024  # 6,291,456 bytes
# Random pixels do not compress: as PNG this is ~5.0 MB raw, which fits under the limit, but ~6.7 MB
# in base64, which does not. JPEG at the fallback quality is well under half of it.
NOISE_SIDE = 1290


@pytest.fixture(scope="module")
def noise() -> Image.Image:
    generator = random.Random(21)
    return Image.frombytes("RGB", (NOISE_SIDE, NOISE_SIDE), generator.randbytes(NOISE_SIDE * NOISE_SIDE * 3))


@pytest.fixture(scope="module")
def noise_png_bytes(noise: Image.Image) -> int:
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    return len(buffer.getvalue())


def test_the_noise_image_sits_between_the_raw_and_the_encoded_limit(noise_png_bytes: int) -> None:
    # The premise of the tests below: counting raw bytes would let this PNG through.
    assert noise_png_bytes < LAMBDA_RESPONSE_PAYLOAD_LIMIT
    assert len(base64.b64encode(b"\0" * noise_png_bytes)) > LAMBDA_RESPONSE_PAYLOAD_LIMIT


def test_default_response_limit_is_within_lambdas() -> None:
    assert Settings().max_response_bytes <= LAMBDA_RESPONSE_PAYLOAD_LIMIT


def test_a_png_that_fits_only_as_raw_bytes_falls_back_to_jpeg(noise: Image.Image) -> None:
    encoded = encode_within(noise, "png", 90, LAMBDA_RESPONSE_PAYLOAD_LIMIT)
    assert (encoded.format, encoded.fallback_from) == ("jpeg", "png")
    assert len(base64.b64encode(encoded.data)) < LAMBDA_RESPONSE_PAYLOAD_LIMIT


@pytest.mark.parametrize("accept", ["image/png", "application/json"])
def test_the_whole_returned_response_fits_lambdas_payload_limit(
    settings: Settings, noise: Image.Image, monkeypatch: pytest.MonkeyPatch, accept: str
) -> None:
    original = Engine.generate

    def noisy(self: Engine, params):  # the real generation, with an incompressible image in its place
        result = original(self, params)
        result.image = noise
        return result

    monkeypatch.setattr(Engine, "generate", noisy)
    limited = Settings(**{**settings.__dict__, "max_response_bytes": Settings().max_response_bytes})
    response = LoggedService(limited)(
        url_event(body={"prompt": "static", "num_inference_steps": 1, "seed": 1}, headers={"accept": accept})
    )
    assert response["statusCode"] == 200
    assert response["headers"]["x-image-fallback"] == "png->jpeg"
    # What the runtime sends back to Lambda: the returned object serialised as JSON.
    assert len(json.dumps(response).encode()) <= LAMBDA_RESPONSE_PAYLOAD_LIMIT
