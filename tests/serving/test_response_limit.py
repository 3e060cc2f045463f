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
    encoded = encode_within([noise], "png", 90, LAMBDA_RESPONSE_PAYLOAD_LIMIT)
    assert (encoded.format, encoded.fallback_from) == ("jpeg", "png")
    assert len(base64.b64encode(encoded.data[0])) < LAMBDA_RESPONSE_PAYLOAD_LIMIT


@pytest.mark.parametrize("accept", ["image/png", "application/json"])
def test_the_whole_returned_response_fits_lambdas_payload_limit(
    settings: Settings, noise: Image.Image, monkeypatch: pytest.MonkeyPatch, accept: str
) -> None:
    original = Engine.generate

    def noisy(self: Engine, params):  # the real generation, with an incompressible image in its place
        result = original(self, params)
        result.images = [noise]
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


def test_several_images_fall_back_together_and_the_json_response_fits(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two 1000² noise PNGs (~3 MB each) fit raw but not base64-encoded: both go out as JPEG.
    generator = random.Random(5)
    noises = [Image.frombytes("RGB", (1000, 1000), generator.randbytes(3_000_000)) for _ in range(2)]
    encoded = encode_within(noises, "png", 90, LAMBDA_RESPONSE_PAYLOAD_LIMIT)
    assert (encoded.format, encoded.fallback_from, len(encoded.data)) == ("jpeg", "png", 2)
    original = Engine.generate

    def noisy(self: Engine, params):
        result = original(self, params)
        result.images = noises[: params.num_images]
        return result

    monkeypatch.setattr(Engine, "generate", noisy)
    response = LoggedService(settings)(
        url_event(
            body={"prompt": "static", "num_inference_steps": 1, "seed": 1, "num_images": 2},
            headers={"accept": "application/json"},
        )
    )
    assert response["statusCode"] == 200
    body = json.loads(response["body"])
    assert (body["format"], body["fallback_from"], len(body["images"])) == ("jpeg", "png", 2)
    assert len(json.dumps(response).encode()) <= LAMBDA_RESPONSE_PAYLOAD_LIMIT


def test_images_that_cannot_fit_are_refused_before_generating(settings: Settings) -> None:
    from sd_lambda.serving.encoding import LEAST_BYTES_PER_PIXEL, response_size

    least = int(256 * 256 * min(LEAST_BYTES_PER_PIXEL.values()))
    # Room for two images at their least size, not for three.
    limited = Settings(**{**settings.__dict__, "max_response_bytes": response_size(least, least)})
    service = LoggedService(limited)
    request = {"prompt": "x", "num_inference_steps": 1, "width": 256, "height": 256, "num_images": 3}
    response = service(url_event(body=request, headers={"accept": "application/json"}))
    assert response["statusCode"] == 413
    error = json.loads(response["body"])["error"]
    assert (error["code"], error["field"]) == ("response_too_large", "num_images")
    assert "fewer images" in error["message"]
    line = service.log_lines()[-1]
    assert line["outcome"] == "response_too_large"
    assert "inference_ms" not in line  # nothing was generated
