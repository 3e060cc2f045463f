"""The local Runtime API and front door in-process, driven like awslambdaric and curl would drive them."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any

import pytest

from sd_lambda.devtools.local.frontdoor import FrontDoor, HttpResult, function_url_event
from sd_lambda.devtools.local.httpio import fetch
from sd_lambda.devtools.local.launcher import LocalLambda
from sd_lambda.devtools.local.runtime import MAX_RESPONSE_BYTES, PREFIX, InvocationResult, RuntimeAPI

WAIT = 30  # seconds; an upper bound for things that happen at once, never a pace


class Invoker:
    """Runs ``api.invoke`` in a thread so the test can play the runtime client."""

    def __init__(self, api: RuntimeAPI, payload: bytes = b'{"prompt": "x"}', timeout_s: float | None = None):
        self.result: InvocationResult | None = None
        self.thread = threading.Thread(target=self._run, args=(api, payload, timeout_s))
        self.thread.start()

    def _run(self, api: RuntimeAPI, payload: bytes, timeout_s: float | None) -> None:
        self.result = api.invoke(payload, timeout_s)

    def wait(self) -> InvocationResult:
        self.thread.join(WAIT)
        assert self.result is not None
        return self.result


@pytest.fixture
def api() -> Iterator[RuntimeAPI]:
    with RuntimeAPI(timeout_s=WAIT) as runtime:
        yield runtime


def call(
    api: RuntimeAPI, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = HTTPConnection(api.address, timeout=WAIT)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), data


def test_next_delivers_the_event_with_lambda_headers(api: RuntimeAPI) -> None:
    invoker = Invoker(api, b'{"prompt": "a fox"}')
    status, headers, body = call(api, "GET", f"{PREFIX}/invocation/next")
    assert status == 200
    assert json.loads(body) == {"prompt": "a fox"}
    request_id = headers["Lambda-Runtime-Aws-Request-Id"]
    assert int(headers["Lambda-Runtime-Deadline-Ms"]) > 0
    assert headers["Lambda-Runtime-Invoked-Function-Arn"] == api.function_arn
    assert headers["Lambda-Runtime-Trace-Id"].startswith("Root=1-")
    status, _, _ = call(api, "POST", f"{PREFIX}/invocation/{request_id}/response", b'{"ok": true}')
    assert status == 202
    result = invoker.wait()
    assert (result.ok, result.request_id, result.payload) == (True, request_id, b'{"ok": true}')


def test_function_error_is_reported_with_its_type(api: RuntimeAPI) -> None:
    invoker = Invoker(api)
    _, headers, _ = call(api, "GET", f"{PREFIX}/invocation/next")
    request_id = headers["Lambda-Runtime-Aws-Request-Id"]
    error = {"errorMessage": "boom", "errorType": "RuntimeError", "stackTrace": []}
    status, _, _ = call(
        api,
        "POST",
        f"{PREFIX}/invocation/{request_id}/error",
        json.dumps(error).encode(),
        {"Lambda-Runtime-Function-Error-Type": "Unhandled"},
    )
    assert status == 202
    result = invoker.wait()
    assert result.ok is False
    assert result.error_type == "Unhandled"
    assert result.error == error


def test_unknown_request_id_is_400_and_the_invocation_still_completes(api: RuntimeAPI) -> None:
    invoker = Invoker(api)
    _, headers, _ = call(api, "GET", f"{PREFIX}/invocation/next")
    status, _, body = call(api, "POST", f"{PREFIX}/invocation/not-the-id/response", b"{}")
    assert status == 400
    assert json.loads(body)["errorType"] == "InvalidRequestID"
    call(api, "POST", f"{PREFIX}/invocation/{headers['Lambda-Runtime-Aws-Request-Id']}/response", b"{}")
    assert invoker.wait().ok


def test_response_over_six_megabytes_is_413_and_fails_the_invocation(api: RuntimeAPI) -> None:
    invoker = Invoker(api)
    _, headers, _ = call(api, "GET", f"{PREFIX}/invocation/next")
    request_id = headers["Lambda-Runtime-Aws-Request-Id"]
    status, _, _ = call(
        api, "POST", f"{PREFIX}/invocation/{request_id}/response", b"x" * (MAX_RESPONSE_BYTES + 1)
    )
    assert status == 413
    assert invoker.wait().error_type == "Function.ResponseSizeTooLarge"


def test_init_error_fails_the_waiting_invocation(api: RuntimeAPI) -> None:
    invoker = Invoker(api)
    error = {"errorMessage": "Unable to import module 'x'", "errorType": "Runtime.ImportModuleError"}
    status, _, _ = call(
        api,
        "POST",
        f"{PREFIX}/init/error",
        json.dumps(error).encode(),
        {"Lambda-Runtime-Function-Error-Type": "Runtime.ImportModuleError"},
    )
    assert status == 202
    result = invoker.wait()
    assert result.error_type == "Runtime.ImportModuleError"
    assert api.init_error == error


def test_process_exit_fails_the_invocation_in_flight(api: RuntimeAPI) -> None:
    invoker = Invoker(api)
    call(api, "GET", f"{PREFIX}/invocation/next")
    api.environment_exited(137)
    result = invoker.wait()
    assert result.error_type == "Runtime.ExitError"
    assert "137" in result.error["errorMessage"]


def test_a_dead_environment_fails_new_invocations_at_once(api: RuntimeAPI) -> None:
    api.environment_exited(1)
    assert api.invoke(b"{}", timeout_s=WAIT).error_type == "Runtime.ExitError"
    api.new_environment()
    error = {"errorMessage": "bad", "errorType": "Runtime.ImportModuleError"}
    assert call(api, "POST", f"{PREFIX}/init/error", json.dumps(error).encode())[0] == 202
    assert api.invoke(b"{}", timeout_s=WAIT).error_type == "Runtime.ImportModuleError"
    api.new_environment()
    invoker = Invoker(api)
    _, headers, _ = call(api, "GET", f"{PREFIX}/invocation/next")
    call(api, "POST", f"{PREFIX}/invocation/{headers['Lambda-Runtime-Aws-Request-Id']}/response", b"{}")
    assert invoker.wait().ok


def test_timeout_fails_the_invocation(api: RuntimeAPI) -> None:
    result = api.invoke(b"{}", timeout_s=0.05)  # nobody polls /next
    assert result.error_type == "Sandbox.Timedout"


def test_unknown_paths_are_404(api: RuntimeAPI) -> None:
    assert call(api, "GET", f"{PREFIX}/invocation/previous")[0] == 404
    assert call(api, "POST", f"{PREFIX}/invocation/x/other", b"{}")[0] == 404


def test_invocations_are_served_one_at_a_time_in_order(api: RuntimeAPI) -> None:
    first = Invoker(api, b'{"n": 1}')
    _, headers, body = call(api, "GET", f"{PREFIX}/invocation/next")
    assert json.loads(body) == {"n": 1}
    second = Invoker(api, b'{"n": 2}')
    call(api, "POST", f"{PREFIX}/invocation/{headers['Lambda-Runtime-Aws-Request-Id']}/response", b"1")
    assert first.wait().payload == b"1"
    _, headers, body = call(api, "GET", f"{PREFIX}/invocation/next")
    assert json.loads(body) == {"n": 2}
    call(api, "POST", f"{PREFIX}/invocation/{headers['Lambda-Runtime-Aws-Request-Id']}/response", b"2")
    assert second.wait().payload == b"2"


# ---- front door ------------------------------------------------------------------------------------


def test_events_look_like_function_url_payload_2() -> None:
    headers = [
        ("Content-Type", "application/json"),
        ("X-Multi", "a"),
        ("X-Multi", "b"),
        ("Cookie", "a=1; b=2"),
    ]
    event = function_url_event("post", "/path?q=1&q=2&x=", headers, b'{"prompt": "x"}')
    assert event["version"] == "2.0"
    assert event["rawPath"] == "/path"
    assert event["rawQueryString"] == "q=1&q=2&x="
    assert event["queryStringParameters"] == {"q": "1,2", "x": ""}
    assert event["headers"]["x-multi"] == "a,b"
    assert event["cookies"] == ["a=1", "b=2"]
    assert event["requestContext"]["http"]["method"] == "POST"
    assert (event["body"], event["isBase64Encoded"]) == ('{"prompt": "x"}', False)
    form = function_url_event("POST", "/", [("Content-Type", "application/x-www-form-urlencoded")], b"{}")
    assert (base64.b64decode(form["body"]), form["isBase64Encoded"]) == (b"{}", True)
    assert "body" not in function_url_event("GET", "/health", [], b"")


def test_results_map_back_to_http_like_a_function_url() -> None:
    png = b"\x89PNG..."
    result = {"statusCode": 201, "headers": {"content-type": "image/png"}, "cookies": ["c=1"]}
    result |= {"body": base64.b64encode(png).decode(), "isBase64Encoded": True}
    mapped = HttpResult.from_invocation(InvocationResult("r1", payload=json.dumps(result).encode()))
    assert (mapped.status, mapped.body) == (201, png)
    assert ("content-type", "image/png") in mapped.headers
    assert ("set-cookie", "c=1") in mapped.headers
    plain = HttpResult.from_invocation(InvocationResult("r2", payload=b'{"image": "x"}'))
    assert (plain.status, plain.body) == (200, b'{"image": "x"}')
    failed = HttpResult.from_invocation(InvocationResult("r3", error_type="Unhandled", error={}))
    assert failed.status == 502
    assert ("x-amzn-errortype", "Unhandled") in failed.headers


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return fetch("POST", url, body, headers, timeout=WAIT)


class BlockingInvoke:
    """A stand-in environment whose invocations finish only when the test says so."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.events: list[dict[str, Any]] = []

    def __call__(self, payload: bytes) -> InvocationResult:
        self.events.append(json.loads(payload))
        self.started.set()
        assert self.release.wait(WAIT)
        return InvocationResult("id", payload=json.dumps({"statusCode": 200, "body": "done"}).encode())


def wait_until(condition: Any) -> None:
    event = threading.Event()
    for _ in range(WAIT * 100):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("condition not reached")


def test_full_queue_answers_429_with_retry_after() -> None:
    invoke = BlockingInvoke()
    with FrontDoor(invoke, queue_size=1) as door:
        answers: list[tuple[int, dict[str, str], bytes]] = []
        threads = [
            threading.Thread(target=lambda: answers.append(post(f"{door.url}/", b"{}"))) for _ in range(2)
        ]
        threads[0].start()
        assert invoke.started.wait(WAIT)  # the first request is with the environment
        threads[1].start()
        wait_until(lambda: door.waiting == 1)  # the second waits in the queue
        status, headers, body = post(f"{door.url}/", b"{}")
        assert status == 429
        assert int(headers["retry-after"]) >= 1
        assert json.loads(body)["error"]["code"] == "queue_full"
        invoke.release.set()
        for thread in threads:
            thread.join(WAIT)
        assert [a[0] for a in answers] == [200, 200]
        assert [a[2] for a in answers] == [b"done", b"done"]
        assert len(invoke.events) == 2


def test_front_door_refuses_oversized_bodies_before_invoking() -> None:
    invoke = BlockingInvoke()
    invoke.release.set()
    with FrontDoor(invoke, max_request_bytes=1000) as door:
        status, _, body = post(f"{door.url}/", b"x" * 1001)
        assert status == 413
        assert b"smaller than 1000" in body
        assert invoke.events == []
        assert post(f"{door.url}/", b"x" * 10)[0] == 200


def test_front_door_rejects_a_zero_queue() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        FrontDoor(BlockingInvoke(), queue_size=0)


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` bytes as they are (malformed on purpose) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_front_door_answers_a_non_numeric_content_length_with_400() -> None:
    invoke = BlockingInvoke()
    invoke.release.set()
    with FrontDoor(invoke) as door:
        reply = raw_exchange(door.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 400")
    assert b"Content-Length 'ten' is not a byte count" in reply
    assert invoke.events == []


def test_front_door_reads_chunked_bodies_and_limits_them() -> None:
    invoke = BlockingInvoke()
    invoke.release.set()
    with FrontDoor(invoke, max_request_bytes=1000) as door:
        connection = HTTPConnection("127.0.0.1", door.port, timeout=WAIT)
        connection.request(
            "POST",
            "/",
            body=iter([b'{"prompt":', b' "a fox"}']),
            headers={"content-type": "application/json"},
            encode_chunked=True,
        )
        assert connection.getresponse().read() == b"done"
        connection.close()
        too_big = raw_exchange(
            door.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"x" * 2000,
        )
    assert too_big.startswith(b"HTTP/1.1 413")
    assert json.loads(invoke.events[0]["body"]) == {"prompt": "a fox"}
    assert len(invoke.events) == 1


def test_runtime_api_reads_chunked_responses(api: RuntimeAPI) -> None:
    invoker = Invoker(api)
    _, headers, _ = call(api, "GET", f"{PREFIX}/invocation/next")
    connection = HTTPConnection(api.address, timeout=WAIT)
    path = f"{PREFIX}/invocation/{headers['Lambda-Runtime-Aws-Request-Id']}/response"
    connection.request("POST", path, body=iter([b'{"a":', b" 1}"]), encode_chunked=True)
    assert connection.getresponse().status == 202
    connection.close()
    assert invoker.wait().payload == b'{"a": 1}'


def test_the_function_inherits_only_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    leaked = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_PROFILE": "admin",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.2/creds",
        "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token",
        "GITHUB_TOKEN": "ghp_example",
    }
    for name, value in {**leaked, "SD_DTYPE": "float32", "HF_HOME": "/tmp/hf", "LANG": "C.UTF-8"}.items():
        monkeypatch.setenv(name, value)
    with LocalLambda({"MODEL_NAME": "m"}, command=[sys.executable, "-c", "pass"]) as environment:
        env = environment.environment()
    assert not set(leaked) & set(env)
    assert (env["SD_DTYPE"], env["HF_HOME"], env["LANG"], env["MODEL_NAME"]) == (
        "float32",
        "/tmp/hf",
        "C.UTF-8",
        "m",
    )
    assert env["PATH"] == os.environ["PATH"]
    assert env["AWS_LAMBDA_RUNTIME_API"] == environment.runtime.address
    assert env["_HANDLER"] == "sd_lambda.serving.handler.handler"
