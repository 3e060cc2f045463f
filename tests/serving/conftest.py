"""Fixtures for the handler tests: a seeded MODEL_ROOT per module and function URL event builders."""

from __future__ import annotations

import base64
import io
import json
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aws_lambda_powertools import Logger
from helpers import TEST_MODEL_NAME
from PIL import Image

from sd_lambda.serving.predictor import Predictor
from sd_lambda.serving.service import Service
from sd_lambda.settings import Settings


def url_event(
    method: str = "POST",
    path: str = "/",
    body: Any = None,
    headers: dict[str, str] | None = None,
    base64_body: bool = False,
) -> dict[str, Any]:
    """A function URL payload 2.0 event; ``body`` may be raw text/bytes or a value to JSON-encode."""
    if body is None:
        raw = b""
    elif isinstance(body, bytes):
        raw = body
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = json.dumps(body).encode()
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": headers or {"content-type": "application/json"},
        "requestContext": {"http": {"method": method, "path": path}, "requestId": str(uuid.uuid4())},
        "body": base64.b64encode(raw).decode() if base64_body else raw.decode("utf-8", "replace"),
        "isBase64Encoded": base64_body,
    }


class Context:
    """The attributes of awslambdaric's LambdaContext that the handler and Powertools read."""

    function_name = "sd-lambda-test"
    memory_limit_in_mb = 1024
    invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:sd-lambda-test"

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())


def body_json(response: dict[str, Any]) -> Any:
    return json.loads(response["body"])


class LoggedService:
    """A Service whose Powertools log lines are captured, one JSON object per line."""

    def __init__(self, settings: Settings, predictor: Predictor | None = None) -> None:
        self.stream = io.StringIO()
        # A unique service name: Powertools attaches its handler once per named logger.
        logger = Logger(service=f"sd-lambda-test-{uuid.uuid4().hex[:8]}", stream=self.stream)
        self.predictor = predictor or Predictor(settings)
        self.service = Service(settings, self.predictor, logger)

    def __call__(self, event: Any) -> dict[str, Any]:
        return self.service.handle(event, Context())

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def settings(module_model_root: Path) -> Settings:
    return Settings(model_root=module_model_root, model_name=TEST_MODEL_NAME)


# ---- init images ----------------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **options: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode()


def gradient(width: int = 32, height: int = 16, mode: str = "RGB") -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    return Image.fromarray(np.stack([ramp, ramp, 255 - ramp], axis=-1)).convert(mode)


def noise() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> str:
    """A PNG whose header claims ``width`` x ``height`` but that carries one row of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
    return base64.b64encode(data + chunk(b"IEND", b"")).decode()
