"""Routing, generation and the per-request log line, for both function URL events and direct invokes.

``Service.handle(event, context)`` never raises: every outcome is a response, every request logs one
JSON line (request id, revision, steps, size, load/inference/encode ms, outcome). Client mistakes are
4xx with a specific code; a model that is not there is 503; anything unexpected is 500 with the request
id (the traceback is logged, never returned). The ``Predictor`` (warm model) survives all of them.
"""

from __future__ import annotations

import base64
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger
from PIL import Image

from sd_lambda.engine.generation import image_seeds
from sd_lambda.layout import LayoutError
from sd_lambda.serving.encoding import EncodedImages, check_fits, encode_within
from sd_lambda.serving.errors import ApiError, internal_error
from sd_lambda.serving.events import (
    HttpRequest,
    binary_response,
    decode_json,
    http_request,
    is_function_url_event,
    json_response,
    wants_json,
)
from sd_lambda.serving.init_image import decode_init_image
from sd_lambda.serving.jobs import (
    JOBS_PATH,
    JobStore,
    caller_key,
    is_job_event,
    job_ref_from_event,
    jobs_disabled,
)
from sd_lambda.serving.predictor import Predictor
from sd_lambda.serving.request import GenerationRequest, parse_request, refuse_unknown_adapters, resolve
from sd_lambda.settings import Settings

ROUTES: dict[str, tuple[str, ...]] = {"/": ("POST",), "/health": ("GET",), JOBS_PATH: ("POST",)}


@dataclass
class Generated:
    """A generation's response: image i was generated with seed ``seed + i`` (generation.image_seeds)."""

    encoded: EncodedImages
    seed: int
    width: int
    height: int
    model: dict[str, str | None]
    timings_ms: dict[str, float]
    strength: float | None = None  # image-to-image only

    @property
    def seeds(self) -> list[int]:
        return list(image_seeds(self.seed, len(self.encoded.data)))

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
            "images": [
                {"image": base64.b64encode(data).decode("ascii"), "seed": seed}
                for data, seed in zip(self.encoded.data, self.seeds, strict=True)
            ],
            "format": self.encoded.format,
            "content_type": self.encoded.media_type,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "model": self.model,
            "timings": self.timings_ms,
            "request_id": request_id,
            **({"strength": self.strength} if self.strength is not None else {}),
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
    def __init__(
        self, settings: Settings, predictor: Predictor, logger: Logger, jobs: JobStore | None = None
    ) -> None:
        self.settings = settings
        self.predictor = predictor
        self.logger = logger
        self.jobs = jobs if jobs is not None else JobStore(settings) if settings.jobs_bucket else None

    def handle(self, event: Any, context: Any = None) -> dict[str, Any]:
        request_id = getattr(context, "aws_request_id", None) or str(uuid.uuid4())
        kind = "http" if is_function_url_event(event) else "job" if is_job_event(event) else "direct"
        log = RequestLog(request_id, kind)
        started = time.perf_counter()
        status, failure = 200, None
        try:
            if log.kind == "http":
                response = self._http(event, log, context)
                status = response["statusCode"]
            elif log.kind == "job":
                response = self._run_job(event, log, context)
                status = response.get("statusCode", 200)
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

    def _http(self, event: dict[str, Any], log: RequestLog, context: Any = None) -> dict[str, Any]:
        try:
            request = http_request(event, self.settings.max_request_bytes)
            log.add(method=request.method, path=request.path)
            allowed = ROUTES.get(request.path) or (
                ("GET",) if request.path.startswith(f"{JOBS_PATH}/") else None
            )
            if allowed is None:
                raise ApiError(
                    404,
                    "not_found",
                    f"no route {request.path}; use POST /, GET /health, POST /jobs or GET /jobs/{{id}}",
                )
            if request.method not in allowed:
                raise ApiError(
                    405,
                    "method_not_allowed",
                    f"{request.method} is not allowed on {request.path}; use {', '.join(allowed)}",
                    headers={"allow": ", ".join(allowed)},
                )
            if request.path == "/health":
                return self._health()
            if request.path.startswith(JOBS_PATH):
                return self._jobs(request, event, log, context)
            generated = self._generate(decode_json(request.body), log, one_image=not wants_json(request))
        except ApiError as error:
            return self._error_response(error, log, log.request_id)
        if wants_json(request):
            return json_response(200, generated.as_json(log.request_id), generated.headers(log.request_id))
        return binary_response(
            200, generated.encoded.data[0], generated.encoded.media_type, generated.headers(log.request_id)
        )

    def _direct(self, event: Any, log: RequestLog) -> dict[str, Any]:
        try:
            return self._generate(event, log).as_json(log.request_id)
        except ApiError as error:
            return self._error_response(error, log, log.request_id)

    def _error_response(self, error: ApiError, log: RequestLog, request_id: str) -> dict[str, Any]:
        log.add(outcome=error.code, error=error.message)
        body = error.body(request_id if error.status >= 500 else None)
        if log.kind != "http":
            return {**body, "statusCode": error.status}
        return json_response(error.status, body, {"x-request-id": request_id, **error.headers})

    # ---- jobs (sd_lambda.serving.jobs) ----------------------------------------------------------------

    def _jobs(
        self, request: HttpRequest, event: dict[str, Any], log: RequestLog, context: Any
    ) -> dict[str, Any]:
        if self.jobs is None:
            raise jobs_disabled()
        caller = caller_key(event)
        headers = {"x-request-id": log.request_id}
        if request.path == JOBS_PATH:
            data = decode_json(request.body)
            # Bad input is refused now, as POST / refuses it: the fields, the start image, the adapter
            # names (what needs the loaded model, e.g. the engine's features, is checked by the run).
            checked = parse_request(data, self.settings)
            self._init_image(checked)
            if checked.loras:
                refuse_unknown_adapters(checked, self.predictor.paths.adapter_names())
            function_name = getattr(context, "function_name", None)
            if not function_name:
                raise ApiError(503, "job_start_failed", "the invocation context names no function to start")
            status = self.jobs.submit(caller, data, function_name, log.request_id)
            location = f"{JOBS_PATH}/{status['job_id']}"
            log.add(job_id=status["job_id"], outcome="queued")
            return json_response(202, {**status, "status_url": location}, {**headers, "location": location})
        job_id = request.path[len(JOBS_PATH) + 1 :]
        log.add(job_id=job_id[:40])
        body = self.jobs.status(caller, job_id)
        log.add(outcome=f"job_{body['status']}")
        return json_response(200, body, headers)

    def _run_job(self, event: dict[str, Any], log: RequestLog, context: Any) -> dict[str, Any]:
        """The asynchronous invocation POST /jobs started: generate as POST / does, store the outcome."""
        try:
            if self.jobs is None:
                raise jobs_disabled()
            ref = job_ref_from_event(event)
        except ApiError as error:
            return self._error_response(error, log, log.request_id)
        jobs = self.jobs
        log.add(job_id=ref.job_id)
        remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
        deadline = jobs.clock() + remaining_ms() / 1000 if callable(remaining_ms) else None
        try:
            status = jobs.run(
                ref, lambda data: self._generate(data, log).as_json(log.request_id), deadline, log.request_id
            )
        except Exception:
            # A bug: record it for the caller (the traceback goes to this invocation's log line). If even
            # that fails, GET /jobs/{id} reports the job lost once its deadline has passed.
            with contextlib.suppress(Exception):
                jobs.fail(ref, internal_error(log.request_id))
            raise
        error = status.get("error") or {}
        log.add(job_status=status.get("status"), outcome=error.get("code", log.fields.get("outcome")))
        return {"job_id": ref.job_id, "status": status.get("status")}

    # ---- the work ------------------------------------------------------------------------------------

    def _health(self) -> dict[str, Any]:
        body = self.predictor.health()
        if not self.predictor.loaded:
            try:
                self.predictor.resolve()
            except ApiError as error:
                return json_response(error.status, {**body, **error.body()})
        return json_response(200, body)

    def _generate(self, data: Any, log: RequestLog, *, one_image: bool = False) -> Generated:
        """Validate, generate and encode. ``one_image``: the response carries one image (binary), so a
        request for more is refused before any work."""
        request = parse_request(data, self.settings)
        if one_image and request.num_images > 1:
            raise ApiError(
                400,
                "needs_json",
                f"num_images={request.num_images} needs the JSON response, which carries a list of "
                "images: send accept: application/json (a binary response holds one image)",
                "num_images",
            )
        init_image = self._init_image(request)
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
            params = resolve(request, engine, self.settings, self.predictor.default_problems, init_image)
            log.add(
                steps=params.num_inference_steps,
                width=params.width,
                height=params.height,
                seed=params.seed,
                images=params.num_images,
                scheduler=params.scheduler,
                decoder=params.decoder,
                **({"strength": params.strength} if params.init_image is not None else {}),
            )
            check_fits(
                params.width,
                params.height,
                params.num_images,
                request.output_format,
                request.quality,
                self.settings.max_response_bytes,
            )
            generate_started = time.perf_counter()
            try:
                result = engine.generate(params)
            except LayoutError as exc:  # an engine that reads the release again (a new compiled shape)
                raise ApiError(503, "model_incomplete", str(exc)) from exc
            inference_ms = _ms(generate_started)
        encode_started = time.perf_counter()
        encoded = encode_within(
            result.images, request.output_format, request.quality, self.settings.max_response_bytes
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
            bytes=sum(map(len, encoded.data)),
            **{f"{name}_ms": ms for name, ms in timings.items()},
        )
        return Generated(
            encoded=encoded,
            seed=params.seed,
            width=params.width,
            height=params.height,
            model={"name": self.settings.model_name, "revision": self.predictor.revision},
            timings_ms=timings,
            strength=params.strength,
        )

    def _init_image(self, request: GenerationRequest) -> Image.Image | None:
        """The request's init_image decoded, before the model lock is taken (bad input costs no wait)."""
        return None if request.init_image is None else decode_init_image(request.init_image, self.settings)

    def _write_log(self, log: RequestLog, failure: BaseException | None) -> None:
        extra = {"request_id": log.request_id, "kind": log.kind, **log.fields}
        if failure is not None:
            # exc_info puts the traceback into this same JSON line.
            self.logger.error("request failed", extra=extra, exc_info=failure)
        else:
            self.logger.info("request", extra=extra)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
