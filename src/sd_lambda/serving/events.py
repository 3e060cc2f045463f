"""Lambda function URL events (payload format 2.0) in, function URL results out.

A function URL hands the handler ``{"version": "2.0", "requestContext": {"http": {...}}, "rawPath",
"headers" (lower-case names), "body", "isBase64Encoded"}`` and turns the returned
``{"statusCode", "headers", "body", "isBase64Encoded"}`` back into the HTTP response.
Anything else that reaches the handler is a direct invoke, whose event is the request object itself.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from sd_lambda.serving.errors import ApiError
from sd_lambda.settings import base64_size


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def is_function_url_event(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and event.get("version") == "2.0"
        and isinstance(event.get("requestContext"), dict)
        and isinstance(event["requestContext"].get("http"), dict)
    )


def http_request(event: dict[str, Any], max_body_bytes: int) -> HttpRequest:
    """The HTTP request inside a 2.0 event; the body is size-checked before and after base64 decoding."""
    http = event["requestContext"]["http"]
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    raw = event.get("body") or ""
    if not isinstance(raw, str):
        raise ApiError(400, "invalid_body", "the event body must be a string")
    # base64 is 4/3 of the payload: refuse early, before decoding an oversized body.
    encoded_limit = base64_size(max_body_bytes) if event.get("isBase64Encoded") else max_body_bytes
    if len(raw) > encoded_limit:
        raise _too_large(max_body_bytes)
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(
                400, "invalid_base64", "the body is marked base64-encoded but is not valid base64"
            ) from None
    else:
        body = raw.encode("utf-8")
    if len(body) > max_body_bytes:
        raise _too_large(max_body_bytes)
    return HttpRequest(
        method=str(http.get("method", "")).upper(),
        path=str(event.get("rawPath") or http.get("path") or "/"),
        headers=headers,
        body=body,
    )


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, "request_too_large", f"the request body exceeds {limit} bytes (SD_MAX_REQUEST_BYTES)"
    )


def decode_json(body: bytes) -> Any:
    """The body as JSON; NaN/Infinity literals pass through here and are refused by validation."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the body is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            "invalid_json",
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body's JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python's int digit limit
        raise ApiError(400, "invalid_json", f"the body's JSON cannot be read: {exc}") from None


def wants_json(request: HttpRequest) -> bool:
    """``Accept`` names application/json with a non-zero q, at least as high as any image type's."""
    weights: dict[str, float] = {}
    for part in request.headers.get("accept", "").split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        weights[media.lower()] = max(quality, weights.get(media.lower(), 0.0))
    json_q = weights.get("application/json", 0.0)
    image_q = max(
        (q for media, q in weights.items() if media.startswith("image/") or media == "*/*"), default=0
    )
    return json_q > 0 and json_q >= image_q


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json", **(headers or {})},
        "body": json.dumps(body, separators=(",", ":")),
        "isBase64Encoded": False,
    }


def binary_response(status: int, data: bytes, media_type: str, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"content-type": media_type, **headers},
        "body": base64.b64encode(data).decode("ascii"),
        "isBase64Encoded": True,
    }
