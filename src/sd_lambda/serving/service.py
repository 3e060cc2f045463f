"""Routing, generation and the per-request log line, for both function URL events and direct invokes.

``Service.handle(event, context)`` never raises: every outcome is a response, every request logs one
JSON line (request id, revision, steps, size, load/inference/encode ms, outcome). Client mistakes are
4xx with a specific code; a model that is not there is 503; anything unexpected is 500 with the request
id (the traceback is logged, never returned). The ``Predictor`` (warm model) survives all of them.
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger

from sd_lambda.layout import LayoutError
from sd_lambda.serving.encoding import EncodedImage, encode_within
from sd_lambda.serving.errors import ApiError, internal_error
from sd_lambda.serving.events import (
    binary_response,
    decode_json,
    http_request,
    is_function_url_event,
    json_response,
    wants_json,
)
from sd_lambda.serving.predictor import Predictor
from sd_lambda.serving.request import parse_request, resolve
from sd_lambda.settings import Settings

ROUTES: dict[str, tuple[str, ...]] = {"/": ("POST",), "/health": ("GET",)}


@dataclass
class Generated:
    encoded: EncodedImage
    seed: int
    width: int
    height: int
    model: dict[str, str | None]
    timings_ms: dict[str, float]

    def headers(self, request_id: str) -> dict[str, str]:
        headers = {
            "x-request-id": request_id,
            "x-seed": str(self.seed),
            "x-model": str(self.model["name"]),
            "x-model-revision": str(self.model["revision"]),
            "server-timing": ", ".join(f"{name};dur={ms}" for name, ms in self.timings_ms.items()),
        }
        if self.encoded.fallback_from:
            headers["x-image-fallback"] = f"{self.encoded.fallback_from}->{self.encoded.format}"
        return headers

    def as_json(self, request_id: str) -> dict[str, Any]:
        return {
            "image": base64.b64encode(self.encoded.data).decode("ascii"),
            "format": self.encoded.format,
            "content_type": self.encoded.media_type,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "model": self.model,
            "timings": self.timings_ms,
            "request_id": request_id,
            **({"fallback_from": self.encoded.fallback_from} if self.encoded.fallback_from else {}),
        }


@dataclass
class RequestLog:
    """The fields of the one log line a request writes; filled in as the request progresses."""

    request_id: str
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    def add(self, **values: Any) -> None:
        self.fields.update(values)


class Service:
    def __init__(self, settings: Settings, predictor: Predictor, logger: Logger) -> None:
        self.settings = settings
        self.predictor = predictor
        self.logger = logger

    def handle(self, event: Any, context: Any = None) -> dict[str, Any]:
        request_id = getattr(context, "aws_request_id", None) or str(uuid.uuid4())
        log = RequestLog(request_id, "http" if is_function_url_event(event) else "direct")
        started = time.perf_counter()
        status, failure = 200, None
        try:
            if log.kind == "http":
                response = self._http(event, log)
                status = response["statusCode"]
            else:
                response = self._direct(event, log)
                status = response.get("statusCode", 200)
        except Exception as exc:  # the one place a bug turns into a 500: log it whole, return only the id
            failure = exc
            error = internal_error(request_id)
            status = error.status
            response = self._error_response(error, log, request_id)
        log.add(status=status, total_ms=_ms(started))
        self._write_log(log, failure)
        return response

    # ---- transports ---------------------------------------------------------------------------------

    def _http(self, event: dict[str, Any], log: RequestLog) -> dict[str, Any]:
        try:
            request = http_request(event, self.settings.max_request_bytes)
            log.add(method=request.method, path=request.path)
            allowed = ROUTES.get(request.path)
            if allowed is None:
                raise ApiError(404, "not_found", f"no route {request.path}; use POST / or GET /health")
            if request.method not in allowed:
                raise ApiError(
                    405,
                    "method_not_allowed",
                    f"{request.method} is not allowed on {request.path}; use {', '.join(allowed)}",
                    headers={"allow": ", ".join(allowed)},
                )
            if request.path == "/health":
                return self._health()
            generated = self._generate(decode_json(request.body), log)
        except ApiError as error:
            return self._error_response(error, log, log.request_id)
        if wants_json(request):
            return json_response(200, generated.as_json(log.request_id), generated.headers(log.request_id))
        return binary_response(
            200, generated.encoded.data, generated.encoded.media_type, generated.headers(log.request_id)
        )

    def _direct(self, event: Any, log: RequestLog) -> dict[str, Any]:
        try:
            return self._generate(event, log).as_json(log.request_id)
        except ApiError as error:
            return self._error_response(error, log, log.request_id)

    def _error_response(self, error: ApiError, log: RequestLog, request_id: str) -> dict[str, Any]:
        log.add(outcome=error.code, error=error.message)
        body = error.body(request_id if error.status >= 500 else None)
        if log.kind == "direct":
            return {**body, "statusCode": error.status}
        return json_response(error.status, body, {"x-request-id": request_id, **error.headers})

    # ---- the work ------------------------------------------------------------------------------------

    def _health(self) -> dict[str, Any]:
        body = self.predictor.health()
        if not self.predictor.loaded:
            try:
                self.predictor.resolve()
            except ApiError as error:
                return json_response(error.status, {**body, **error.body()})
        return json_response(200, body)

    def _generate(self, data: Any, log: RequestLog) -> Generated:
        request = parse_request(data, self.settings)
        with self.predictor.exclusive() as warm:
            log.add(revision=self.predictor.revision, load_ms=round(warm.load_ms, 1), cold=warm.load_ms > 0)
            if warm.load_ms > 0 and self.predictor.prefetch is not None:
                log.add(prefetch=self.predictor.prefetch.describe())
            if warm.load_ms > 0 and self.predictor.default_problems:
                self.logger.error(
                    "the model's defaults do not fit this function's limits: requests relying on them "
                    "get 503 model_config until a limit (SD_*) or the model's defaults change",
                    extra={"default_problems": self.predictor.default_problems},
                )
            engine = warm.engine
            params = resolve(
                request,
                engine.defaults,
                self.settings,
                engine.schedulers,
                engine.decoders,
                self.predictor.default_problems,
            )
            log.add(
                steps=params.num_inference_steps,
                width=params.width,
                height=params.height,
                seed=params.seed,
                scheduler=params.scheduler,
                decoder=params.decoder,
            )
            generate_started = time.perf_counter()
            try:
                result = engine.generate(params)
            except LayoutError as exc:  # an engine that reads the release again (a new compiled shape)
                raise ApiError(503, "model_incomplete", str(exc)) from exc
            inference_ms = _ms(generate_started)
        encode_started = time.perf_counter()
        encoded = encode_within(
            result.image, request.output_format, request.quality, self.settings.max_response_bytes
        )
        timings = {
            "load": round(warm.load_ms, 1),
            # Measured here, so the contract holds whatever breakdown the engine adds (e.g. decode).
            "inference": inference_ms,
            **{name: round(ms, 1) for name, ms in result.timings_ms.items() if name != "inference"},
            "encode": _ms(encode_started),
        }
        log.add(
            outcome="ok",
            format=encoded.format,
            bytes=len(encoded.data),
            **{f"{name}_ms": ms for name, ms in timings.items()},
        )
        return Generated(
            encoded=encoded,
            seed=params.seed,
            width=params.width,
            height=params.height,
            model={"name": self.settings.model_name, "revision": self.predictor.revision},
            timings_ms=timings,
        )

    def _write_log(self, log: RequestLog, failure: BaseException | None) -> None:
        extra = {"request_id": log.request_id, "kind": log.kind, **log.fields}
        if failure is not None:
            # exc_info puts the traceback into this same JSON line.
            self.logger.error("request failed", extra=extra, exc_info=failure)
        else:
            self.logger.info("request", extra=extra)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
