"""The Lambda Runtime API of one execution environment, served on 127.0.0.1.

What ``awslambdaric`` (the image's entrypoint) talks to, at ``AWS_LAMBDA_RUNTIME_API``:

- ``GET  /2018-06-01/runtime/invocation/next``: long-polls; 200 with the event as body and the headers
  ``Lambda-Runtime-Aws-Request-Id``, ``Lambda-Runtime-Deadline-Ms``, ``Lambda-Runtime-Invoked-Function-Arn``
  and ``Lambda-Runtime-Trace-Id``.
- ``POST /2018-06-01/runtime/invocation/{id}/response``: 202; 413 over Lambda's 6 MB response limit
  (the invocation then fails with ``Function.ResponseSizeTooLarge``, as on AWS); 400 for an unknown id.
- ``POST /2018-06-01/runtime/invocation/{id}/error``: 202; the invocation fails with the posted error.
- ``POST /2018-06-01/runtime/init/error``: 202; a waiting invocation fails with the init error.

Like one execution environment it runs one invocation at a time: ``invoke`` blocks until the function
answers, fails, times out, or its process exits (``environment_exited``).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from sd_lambda.devtools.local.httpio import BodyError, LocalHandler, LocalServer

PREFIX = "/2018-06-01/runtime"
# Lambda's limit for a synchronous response, as its Runtime API enforces it.
MAX_RESPONSE_BYTES = 6_291_556
_INVOCATION = re.compile(rf"^{PREFIX}/invocation/(?P<id>[^/]+)/(?P<kind>response|error)\Z")

log = logging.getLogger(__name__)
_ALIVE = object()  # the exit status of an environment whose process has not exited


@dataclass
class InvocationResult:
    """What one invocation produced: the function's response bytes, or an error."""

    request_id: str
    payload: bytes | None = None
    error_type: str | None = None
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


@dataclass
class _Invocation:
    payload: bytes
    timeout_s: float
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    delivered: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: InvocationResult | None = None

    def finish(self, result: InvocationResult) -> bool:
        if self.done.is_set():
            return False
        self.result = result
        self.done.set()
        return True


def trace_id() -> str:
    """An X-Ray style trace header: ``Root=1-<epoch hex>-<96 bits>;Parent=<64 bits>;Sampled=0``."""
    return f"Root=1-{int(time.time()):08x}-{secrets.token_hex(12)};Parent={secrets.token_hex(8)};Sampled=0"


class RuntimeAPI:
    """The Runtime API server plus the invoke side the front door (or a test) calls."""

    def __init__(
        self,
        function_name: str = "sd-lambda",
        region: str = "us-east-1",
        account: str = "000000000000",
        timeout_s: float = 300.0,
        port: int = 0,
    ) -> None:
        self.function_name = function_name
        self.function_arn = f"arn:aws:lambda:{region}:{account}:function:{function_name}"
        self.timeout_s = timeout_s
        self._condition = threading.Condition()
        self._invoke_lock = threading.Lock()
        self._current: _Invocation | None = None
        self._closing = False
        self.init_error: dict[str, Any] | None = None
        self._exit_status: object = _ALIVE
        self._server = LocalServer(("127.0.0.1", port), _handler_class(self))
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``host:port``, the value of ``AWS_LAMBDA_RUNTIME_API``."""
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> RuntimeAPI:
        self._thread = threading.Thread(target=self._server.serve_forever, name="runtime-api", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> RuntimeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the invoke side ------------------------------------------------------------------------

    def invoke(self, payload: bytes, timeout_s: float | None = None) -> InvocationResult:
        """Run one invocation (waiting for any other to finish first) and return its result."""
        with self._invoke_lock:
            invocation = _Invocation(payload, self.timeout_s if timeout_s is None else timeout_s)
            with self._condition:
                failure = self._environment_failure(invocation.request_id)
                if failure is not None:  # the environment is already dead: fail at once, as Lambda does
                    return failure
                self._current = invocation
                self._condition.notify_all()
            if not invocation.done.wait(invocation.timeout_s):
                invocation.finish(
                    InvocationResult(
                        invocation.request_id,
                        error_type="Sandbox.Timedout",
                        error={"errorMessage": f"Task timed out after {invocation.timeout_s:.2f} seconds"},
                    )
                )
            with self._condition:
                self._current = None
            assert invocation.result is not None
            return invocation.result

    def environment_exited(self, returncode: int | None) -> None:
        """The function's process ended: the invocation in flight (if any) fails like on AWS."""
        with self._condition:
            self._exit_status = returncode
            current = self._current
            failure = None if current is None else self._environment_failure(current.request_id)
        if current is not None and failure is not None:
            current.finish(failure)

    def new_environment(self) -> None:
        """A fresh process is starting: forget the previous one's init error and exit."""
        with self._condition:
            self.init_error = None
            self._exit_status = _ALIVE

    def _environment_failure(self, request_id: str) -> InvocationResult | None:
        """Why an invocation cannot run in this environment (init failed, process gone), or None."""
        if self.init_error is not None:
            error = self.init_error
            return InvocationResult(
                request_id, error_type=str(error.get("errorType") or "Runtime.Unknown"), error=error
            )
        if self._exit_status is not _ALIVE:
            message = f"RequestId: {request_id} Error: Runtime exited with status {self._exit_status}"
            return InvocationResult(
                request_id, error_type="Runtime.ExitError", error={"errorMessage": message}
            )
        return None

    # ---- the runtime side (called by the HTTP handler) ---------------------------------------------

    def _next(self) -> _Invocation | None:
        with self._condition:
            while not self._closing:
                current = self._current
                if current is not None and not current.delivered and not current.done.is_set():
                    current.delivered = True
                    return current
                self._condition.wait()
        return None

    def _complete(self, request_id: str, kind: str, body: bytes, error_type: str | None) -> HTTPStatus:
        with self._condition:
            current = self._current
        if current is None or current.request_id != request_id or not current.delivered:
            return HTTPStatus.BAD_REQUEST
        if kind == "response" and len(body) > MAX_RESPONSE_BYTES:
            current.finish(
                InvocationResult(
                    request_id,
                    error_type="Function.ResponseSizeTooLarge",
                    error={
                        "errorMessage": f"Response payload size ({len(body)} bytes) exceeded maximum allowed "
                        f"payload size ({MAX_RESPONSE_BYTES} bytes)."
                    },
                )
            )
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        if kind == "response":
            current.finish(InvocationResult(request_id, payload=body))
        else:
            error = _json_object(body)
            current.finish(
                InvocationResult(
                    request_id, error_type=error_type or str(error.get("errorType", "Unhandled")), error=error
                )
            )
        return HTTPStatus.ACCEPTED

    def _init_error(self, body: bytes, error_type: str | None) -> None:
        error = _json_object(body)
        if error_type:
            error.setdefault("errorType", error_type)
        with self._condition:
            self.init_error = error
            current = self._current
        if current is not None:
            current.finish(self._environment_failure(current.request_id))  # type: ignore[arg-type]


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {"errorMessage": body.decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"errorMessage": str(value)}


def _handler_class(api: RuntimeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(LocalHandler):
        log_name = "runtime api"

        def _send(
            self, status: HTTPStatus, body: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            self.send(
                status,
                [*(headers or {}).items(), ("Content-Type", "application/json")],
                json.dumps(body).encode(),
            )

        def do_GET(self) -> None:
            if self.path != f"{PREFIX}/invocation/next":
                self._send(HTTPStatus.NOT_FOUND, {"errorMessage": f"unknown path {self.path}"})
                return
            invocation = api._next()
            if invocation is None:  # shutting down
                self.close_connection = True
                return
            deadline_ms = int(time.time() * 1000 + invocation.timeout_s * 1000)
            self.send_response(HTTPStatus.OK)
            self.send_header("Lambda-Runtime-Aws-Request-Id", invocation.request_id)
            self.send_header("Lambda-Runtime-Deadline-Ms", str(deadline_ms))
            self.send_header("Lambda-Runtime-Invoked-Function-Arn", api.function_arn)
            self.send_header("Lambda-Runtime-Trace-Id", trace_id())
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(invocation.payload)))
            self.end_headers()
            self.wfile.write(invocation.payload)

        def do_POST(self) -> None:
            try:
                body = self.read_body()
            except BodyError as error:
                self._send(
                    HTTPStatus(error.status), {"errorMessage": error.message, "errorType": "InvalidBody"}
                )
                return
            error_type = self.headers.get("Lambda-Runtime-Function-Error-Type")
            if self.path == f"{PREFIX}/init/error":
                api._init_error(body, error_type)
                self._send(HTTPStatus.ACCEPTED, {"status": "OK"})
                return
            match = _INVOCATION.match(self.path)
            if match is None:
                self._send(HTTPStatus.NOT_FOUND, {"errorMessage": f"unknown path {self.path}"})
                return
            status = api._complete(match["id"], match["kind"], body, error_type)
            if status == HTTPStatus.ACCEPTED:
                self._send(status, {"status": "OK"})
            elif status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                self._send(
                    status,
                    {
                        "errorMessage": "Exceeded maximum allowed payload size",
                        "errorType": "RequestEntityTooLarge",
                    },
                )
            else:
                self._send(
                    status,
                    {"errorMessage": f"Invalid request ID {match['id']}", "errorType": "InvalidRequestID"},
                )

    return Handler
