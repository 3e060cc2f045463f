"""HTTP plumbing shared by the local servers (Runtime API, front door) and the local callers.

- ``LocalServer``: the threading server both run on (a peer hanging up is not a traceback).
- ``LocalHandler``: the request-handler base both servers use (HTTP/1.1 keep-alive, no Nagle delay,
  one body reader for ``Content-Length`` and chunked bodies, one way to send a response).
- ``fetch``: one urllib call that returns ``(status, lower-cased headers, body)`` for any status.
"""

from __future__ import annotations

import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)
_MAX_LINE = 65536


class BodyError(Exception):
    """A request body that cannot be read: ``status`` 400 (malformed) or 413 (over the limit)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class LocalServer(ThreadingHTTPServer):
    """A threading HTTP server on which a peer hanging up (a function process stopped mid long-poll,
    a client that gave up) is logged as one line, not printed as a traceback."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.debug("connection from %s closed: %s", client_address, error)
            return
        super().handle_error(request, client_address)


class LocalHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: the runtime client (libcurl) and HTTP clients reuse one connection.
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes: without TCP_NODELAY, Nagle + delayed ACK adds ~40 ms.
    disable_nagle_algorithm = True
    log_name = "local http"
    log_level = logging.DEBUG

    def log_message(self, format: str, *args: Any) -> None:
        log.log(self.log_level, f"{self.log_name}: {format}", *args)

    def read_body(self, limit: int | None = None) -> bytes:
        """The request body; ``BodyError`` if it is malformed or longer than ``limit``.

        After a ``BodyError`` the connection is marked to close: an unread body must never be parsed
        as the next request.
        """
        try:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return self._chunked(limit)
            raw = self.headers.get("Content-Length")
            if raw is None:
                return b""
            if not raw.strip().isdigit():
                raise BodyError(400, f"Content-Length {raw!r} is not a byte count")
            length = int(raw)
            if limit is not None and length > limit:
                raise BodyError(413, f"the body is {length} bytes; the limit is {limit}")
            return self.rfile.read(length)
        except BodyError:
            self.close_connection = True
            raise

    def _chunked(self, limit: int | None) -> bytes:
        chunks, total = [], 0
        while True:
            line = self.rfile.readline(_MAX_LINE)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise BodyError(400, f"malformed chunk size {line[:40]!r}") from None
            if size == 0:
                break
            total += size
            if limit is not None and total > limit:
                raise BodyError(413, f"the chunked body exceeds the limit of {limit} bytes")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(_MAX_LINE)  # the CRLF after each chunk
        while self.rfile.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def send(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def fetch(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> tuple[int, dict[str, str], bytes]:
    """``(status, lower-cased headers, body)``; HTTP error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
