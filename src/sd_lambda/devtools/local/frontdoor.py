"""A local stand-in for the Lambda function URL: plain HTTP in, payload format 2.0 events out.

Each HTTP request becomes the event a function URL would send (lower-case headers, ``cookies``,
``rawQueryString``, base64 body unless it is text), waits in a bounded FIFO queue for the single
execution environment, and the function's result is turned back into HTTP the way a function URL does:
a ``{"statusCode", "headers", "body", "isBase64Encoded"}`` result is unpacked, any other JSON result is
returned as ``application/json`` with 200, and a function error is a 502. When ``queue_size`` requests
are already waiting, the next one gets 429 with ``Retry-After``. Listens on 127.0.0.1 only.

One request never reaches the function: ``GET /`` answers the playground page
(``sd_lambda.devtools.local.playground``), a local-only page to try requests from a browser.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sd_lambda.devtools.local import playground
from sd_lambda.devtools.local.httpio import BodyError, LocalHandler, LocalServer
from sd_lambda.devtools.local.runtime import InvocationResult

# A function URL refuses request payloads over 6 MB before the function runs.
MAX_REQUEST_BYTES = 6 * 1024 * 1024
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript")

Invoke = Callable[[bytes], InvocationResult]
log = logging.getLogger(__name__)


def function_url_event(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    source_ip: str = "127.0.0.1",
    request_id: str | None = None,
) -> dict[str, Any]:
    """The payload format 2.0 event a function URL sends for this HTTP request."""
    url = urlsplit(target)
    merged: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in headers:
        name = name.lower()
        if name == "cookie":
            cookies.extend(part.strip() for part in value.split(";") if part.strip())
            continue
        merged[name] = f"{merged[name]},{value}" if name in merged else value
    query: dict[str, str] = {}
    for name, value in parse_qsl(url.query, keep_blank_values=True):
        query[name] = f"{query[name]},{value}" if name in query else value
    now = datetime.now(UTC)
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": url.path or "/",
        "rawQueryString": url.query,
        "headers": merged,
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "local",
            "domainName": merged.get("host", "localhost"),
            "domainPrefix": "local",
            "http": {
                "method": method.upper(),
                "path": url.path or "/",
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": merged.get("user-agent", ""),
            },
            "requestId": request_id or str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now.timestamp() * 1000),
        },
        "isBase64Encoded": False,
    }
    if cookies:
        event["cookies"] = cookies
    if query:
        event["queryStringParameters"] = query
    if body:
        is_text = merged.get("content-type", "").lower().startswith(TEXT_TYPES)
        try:
            event["body"] = body.decode("utf-8") if is_text else None
        except UnicodeDecodeError:
            event["body"] = None
        if event["body"] is None:
            event["body"] = base64.b64encode(body).decode("ascii")
            event["isBase64Encoded"] = True
    return event


class HttpResult:
    """What the front door writes back: status, headers, body."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @classmethod
    def json(cls, status: int, value: Any, headers: list[tuple[str, str]] | None = None) -> HttpResult:
        return cls(
            status, [("content-type", "application/json"), *(headers or [])], json.dumps(value).encode()
        )

    @classmethod
    def from_invocation(cls, result: InvocationResult) -> HttpResult:
        """Map the function's result to HTTP the way a function URL does."""
        request_header = [("x-amzn-requestid", result.request_id)]
        if not result.ok or result.payload is None:
            return cls.json(
                502,
                {"Message": "Internal Server Error"},
                [*request_header, ("x-amzn-errortype", str(result.error_type))],
            )
        try:
            value = json.loads(result.payload)
        except ValueError:
            return cls(200, [("content-type", "application/json"), *request_header], result.payload)
        if not (isinstance(value, dict) and "statusCode" in value):
            return cls(200, [("content-type", "application/json"), *request_header], result.payload)
        headers = [(str(k), str(v)) for k, v in (value.get("headers") or {}).items()]
        headers += [("set-cookie", str(c)) for c in value.get("cookies") or []]
        body = value.get("body") or ""
        data = base64.b64decode(body) if value.get("isBase64Encoded") else str(body).encode("utf-8")
        return cls(int(value["statusCode"]), [*headers, *request_header], data)


class FrontDoor:
    """HTTP on 127.0.0.1 -> one invocation at a time through ``invoke``, with a bounded wait queue."""

    def __init__(
        self, invoke: Invoke, port: int = 0, queue_size: int = 4, max_request_bytes: int = MAX_REQUEST_BYTES
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._invoke = invoke
        self.max_request_bytes = max_request_bytes
        self._queue: queue.Queue[tuple[bytes, Future[InvocationResult]] | None] = queue.Queue(
            maxsize=queue_size
        )
        self._seconds_per_invocation = 1.0
        self._server = LocalServer(("127.0.0.1", port), _handler_class(self))
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def waiting(self) -> int:
        """Requests queued and not yet handed to the environment."""
        return self._queue.qsize()

    def start(self) -> FrontDoor:
        for target, name in (
            (self._dispatch, "front-door-dispatch"),
            (self._server.serve_forever, "front-door"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        while True:  # fail whatever still waits, then stop the dispatcher
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].set_exception(RuntimeError("front door closed"))
        self._queue.put(None)

    def __enter__(self) -> FrontDoor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, event: dict[str, Any]) -> Future[InvocationResult] | None:
        """Queue one event; None when the queue is full."""
        future: Future[InvocationResult] = Future()
        try:
            self._queue.put_nowait((json.dumps(event).encode(), future))
        except queue.Full:
            return None
        return future

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the wait ahead at the recent invocation pace."""
        return max(1, math.ceil(self._seconds_per_invocation * (self.waiting + 1)))

    def _dispatch(self) -> None:
        while (item := self._queue.get()) is not None:
            payload, future = item
            started = time.monotonic()
            try:
                future.set_result(self._invoke(payload))
            except Exception as exc:  # a broken environment must not stop the queue
                log.exception("invocation failed")
                future.set_exception(exc)
            # Smoothed, so one slow cold start does not dominate the Retry-After hint.
            self._seconds_per_invocation = 0.7 * self._seconds_per_invocation + 0.3 * (
                time.monotonic() - started
            )

    def handle(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> HttpResult:
        if method.upper() in ("GET", "HEAD") and urlsplit(target).path == "/":
            # The playground is the front door's own page: the function never sees this request.
            return HttpResult(200, playground.headers(), playground.page())
        future = self.submit(function_url_event(method, target, headers, body))
        if future is None:
            retry = self.retry_after()
            return HttpResult.json(
                429,
                {
                    "error": {
                        "code": "queue_full",
                        "message": f"busy: retry in about {retry} s",
                        "field": None,
                    }
                },
                [("retry-after", str(retry))],
            )
        try:
            return HttpResult.from_invocation(future.result())
        except Exception:
            return HttpResult.json(502, {"Message": "Internal Server Error"})


def _handler_class(door: FrontDoor) -> type[BaseHTTPRequestHandler]:
    class Handler(LocalHandler):
        log_name = "front door"
        log_level = logging.INFO

        def _serve(self) -> None:
            try:
                body = self.read_body(door.max_request_bytes)
            except BodyError as error:
                message = (
                    f"Request must be smaller than {door.max_request_bytes} bytes"
                    if error.status == 413
                    else error.message
                )
                result = HttpResult.json(error.status, {"Message": message})
            else:
                result = door.handle(self.command, self.path, list(self.headers.items()), body)
            self.send(result.status, result.headers, result.body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve

    return Handler
