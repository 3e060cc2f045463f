"""A local stand-in for a function URL with ``AWS_IAM`` auth: it checks SigV4 like AWS does.

The signature is recomputed with botocore's own ``SigV4Auth`` from what actually arrived (method, path,
query, the headers the client declared as signed, the body bytes) for known test credentials, then
compared. Requests whose date is more than five minutes from the server's clock are refused, as AWS
refuses them. Behind the check, ``responses`` (a queue) decides what each accepted request gets.
"""

from __future__ import annotations

import hmac
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACCESS_KEY = "AKIDEXAMPLETESTONLY"
SECRET_KEY = "test-secret-key-never-used-outside-tests"
REGION = "eu-west-1"
MAX_SKEW = timedelta(minutes=5)
AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/"
    r"aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})$"
)


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, body: object, **headers: str) -> Reply:
    return Reply(status, json.dumps(body).encode(), {"content-type": "application/json", **headers})


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    verdict: str  # "ok" or why the signature was refused


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up (the read-timeout test) leaves a broken pipe behind: expected, not news.
        pass


class SigV4Server:
    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.clock = clock
        self.replies: list[Reply] = []
        self.default_reply = Reply(200, b"ok", {"content-type": "text/plain"})
        self.received: list[Received] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                verdict = server.verify(self.command, self.path, headers, body)
                server.received.append(Received(self.command, self.path, headers, body, verdict))
                if verdict != "ok":
                    reply = json_reply(403, {"Message": f"Forbidden. {verdict}"})
                else:
                    reply = server.replies.pop(0) if server.replies else server.default_reply
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            # GET /jobs/{id} polls: signed the same way, over an empty body.
            do_GET = do_POST

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> SigV4Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def verify(self, method: str, path: str, headers: dict[str, str], body: bytes) -> str:
        match = AUTHORIZATION.match(headers.get("authorization", ""))
        if match is None:
            return "missing or malformed Authorization header"
        if match["key"] != ACCESS_KEY:
            return "unknown access key"
        if (match["region"], match["service"]) != (REGION, "lambda"):
            return f"wrong scope {match['region']}/{match['service']}"
        signed = match["signed"].split(";")
        if "host" not in signed or "x-amz-date" not in signed:
            return "host and x-amz-date must be signed"
        if any(name not in headers for name in signed):
            return "a signed header is missing"
        try:
            when = datetime.strptime(headers["x-amz-date"], SIGV4_TIMESTAMP).replace(tzinfo=UTC)
        except ValueError:
            return "malformed x-amz-date"
        if match["date"] != headers["x-amz-date"][:8]:
            return "credential date does not match x-amz-date"
        if abs(self.clock() - when) > MAX_SKEW:
            return "Signature expired: the request date is more than 5 minutes from the server's clock"
        request = AWSRequest(
            method=method,
            url=f"http://{headers['host']}{path}",
            data=body,
            headers={name: headers[name] for name in signed},
        )
        request.context["timestamp"] = headers["x-amz-date"]
        signer = SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "lambda", REGION)
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if not hmac.compare_digest(expected, match["signature"]):
            return "The request signature we calculated does not match the signature you provided"
        return "ok"
