"""The function URL client: SigV4 over exactly the bytes sent, retries, errors, the CLI."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import botocore.auth
import pytest
import requests

from sd_lambda.cli import main
from sd_lambda.ops.client import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    FunctionUrlClient,
    InvokeError,
    RetryPolicy,
    generate,
    parse_server_timing,
    region_from_url,
    sign,
)

from .sigv4_server import ACCESS_KEY, REGION, SECRET_KEY, Reply, SigV4Server, json_reply

PNG = b"\x89PNG\r\n\x1a\nnot-really-decoded-by-the-client"
IMAGE_HEADERS = {
    "content-type": "image/png",
    "x-seed": "7",
    "x-request-id": "req-1",
    "x-model": "test--tiny-sd",
    "x-model-revision": "r1",
    "server-timing": "load;dur=12.5, inference;dur=800.1, encode;dur=3",
}


@pytest.fixture(autouse=True)
def test_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Known credentials through botocore's default chain (environment), and nothing else to find."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def server() -> Iterator[SigV4Server]:
    with SigV4Server() as running:
        yield running


class Sleeps:
    """An instant ``sleep`` that records what the client asked for."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def instant(attempts: int = 5, sleeps: Sleeps | None = None) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, sleep=sleeps or Sleeps(), random=lambda: 0.5)


# ---- signing ---------------------------------------------------------------------------------------


def test_signed_request_is_accepted_and_carries_exactly_the_payload(server: SigV4Server) -> None:
    server.replies.append(Reply(200, PNG, IMAGE_HEADERS))
    response = generate(
        server.url, "a red cube", region=REGION, retry=instant(), seed=7, num_inference_steps=2, width=None
    )
    assert [r.verdict for r in server.received] == ["ok"]
    assert json.loads(server.received[0].body) == {
        "prompt": "a red cube",
        "seed": 7,
        "num_inference_steps": 2,
    }
    assert response.image == PNG
    assert response.seed == 7
    assert response.timings_ms == {"load": 12.5, "inference": 800.1, "encode": 3.0}
    assert (response.model, response.revision, response.request_id) == ("test--tiny-sd", "r1", "req-1")
    assert response.attempts == 1


def _signed(url: str, body: bytes) -> dict[str, str]:
    from sd_lambda.ops.client import default_credentials

    return sign(url, body, {"Content-Type": "application/json"}, default_credentials(), REGION)


def test_tampered_body_is_rejected(server: SigV4Server) -> None:
    body = b'{"prompt":"a cat"}'
    headers = _signed(server.url, body)
    assert requests.post(server.url, data=body, headers=headers, timeout=10).status_code == 200
    tampered = requests.post(server.url, data=b'{"prompt":"a dog"}', headers=headers, timeout=10)
    assert tampered.status_code == 403
    assert "signature we calculated does not match" in server.received[-1].verdict


@pytest.mark.parametrize(
    ("header", "value"), [("Content-Type", "text/plain"), ("X-Amz-Date", "20200101T000000Z")]
)
def test_tampered_signed_header_is_rejected(server: SigV4Server, header: str, value: str) -> None:
    body = b'{"prompt":"a cat"}'
    headers = {**_signed(server.url, body), header: value}
    assert requests.post(server.url, data=body, headers=headers, timeout=10).status_code == 403
    assert server.received[-1].verdict != "ok"


def test_stale_date_is_rejected_with_the_permissions_hint() -> None:
    skewed_clock = lambda: datetime.now(UTC) + timedelta(minutes=10)  # noqa: E731
    with SigV4Server(clock=skewed_clock) as skewed, pytest.raises(InvokeError) as caught:
        generate(skewed.url, "a cat", region=REGION, retry=instant())
    assert caught.value.status == 403
    assert "Signature expired" in str(caught.value)
    assert "lambda:InvokeFunctionUrl" in str(caught.value)
    assert "lambda:InvokeFunction " in str(caught.value)
    assert len(skewed.received) == 1  # 403 is final


def test_wrong_secret_is_rejected(server: SigV4Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(InvokeError, match="HTTP 403"):
        generate(server.url, "a cat", region=REGION, retry=instant())


def test_every_attempt_is_signed_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a long backoff the first signature would be stale; the retry must carry a new one."""
    now = [datetime.now(UTC)]
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now[0].replace(tzinfo=None))

    def advance(seconds: float) -> None:
        now[0] += timedelta(seconds=seconds)

    policy = RetryPolicy(attempts=2, base_delay_s=600, max_delay_s=600, sleep=advance, random=lambda: 1.0)
    with SigV4Server(clock=lambda: now[0]) as server:
        server.replies += [
            json_reply(503, {"Message": "Service Unavailable"}),
            Reply(200, PNG, IMAGE_HEADERS),
        ]
        response = generate(server.url, "a cat", region=REGION, retry=policy)
    assert response.attempts == 2
    assert [r.verdict for r in server.received] == ["ok", "ok"]
    dates = [r.headers["x-amz-date"] for r in server.received]
    assert dates[0] != dates[1]


# ---- retries ---------------------------------------------------------------------------------------


def test_503_then_200_succeeds(server: SigV4Server) -> None:
    sleeps = Sleeps()
    server.replies += [json_reply(503, {"Message": "Service Unavailable"}), Reply(200, PNG, IMAGE_HEADERS)]
    response = generate(server.url, "a cat", region=REGION, retry=instant(sleeps=sleeps))
    assert response.image == PNG
    assert response.attempts == 2
    assert len(server.received) == 2
    assert len(sleeps.calls) == 1


@pytest.mark.parametrize("status", [429, 502, 504])
def test_other_retryable_statuses_are_retried(server: SigV4Server, status: int) -> None:
    server.replies += [json_reply(status, {"Message": "busy"}), Reply(200, PNG, IMAGE_HEADERS)]
    assert generate(server.url, "a cat", region=REGION, retry=instant()).attempts == 2


@pytest.mark.parametrize(("retry_after", "waited"), [("7", 7.0), ("600", RetryPolicy.max_delay_s)])
def test_retry_after_is_the_least_wait_up_to_the_cap(
    server: SigV4Server, retry_after: str, waited: float
) -> None:
    sleeps = Sleeps()
    server.replies += [
        Reply(429, b'{"Message": "Too Many Requests"}', {"retry-after": retry_after}),
        Reply(200, PNG, IMAGE_HEADERS),
    ]
    assert generate(server.url, "a cat", region=REGION, retry=instant(sleeps=sleeps)).attempts == 2
    # Without the header the jittered wait would be 0.5 s (instant(): random 0.5 x base 1 s).
    assert sleeps.calls == [waited]


@pytest.mark.parametrize("status", [400, 404, 413, 500])
def test_other_errors_are_not_retried(server: SigV4Server, status: int) -> None:
    server.replies.append(
        json_reply(status, {"error": {"code": "out_of_range", "message": "width must be between 8 and 1024"}})
    )
    sleeps = Sleeps()
    with pytest.raises(InvokeError) as caught:
        generate(server.url, "a cat", region=REGION, retry=instant(sleeps=sleeps))
    assert caught.value.status == status
    assert str(caught.value) == f"HTTP {status}: out_of_range: width must be between 8 and 1024"
    assert len(server.received) == 1
    assert sleeps.calls == []


def test_exhausted_retries_give_a_clear_error(server: SigV4Server) -> None:
    server.default_reply = json_reply(503, {"Message": "Service Unavailable"})
    sleeps = Sleeps()
    with pytest.raises(InvokeError, match=r"gave up after 3 attempts; last: HTTP 503: Service Unavailable"):
        generate(server.url, "a cat", region=REGION, retry=instant(attempts=3, sleeps=sleeps))
    assert len(server.received) == 3
    assert len(sleeps.calls) == 2


def test_connection_errors_are_retried() -> None:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    with pytest.raises(InvokeError, match="gave up after 2 attempts; last: connection failed"):
        generate(
            f"http://127.0.0.1:{port}/", "a cat", region=REGION, retry=instant(attempts=2, sleeps=sleeps)
        )
    assert len(sleeps.calls) == 1


def test_read_timeout_is_final() -> None:
    """A function that is still running must not be asked to do the work again."""
    release = threading.Event()
    with SigV4Server() as server:
        server.default_reply = Reply(200, PNG, IMAGE_HEADERS)
        original = server.verify

        def slow_verify(*args: object) -> str:
            release.wait(timeout=30)
            return original(*args)

        server.verify = slow_verify  # type: ignore[method-assign]
        client = FunctionUrlClient(
            server.url, region=REGION, retry=instant(), timeout=(CONNECT_TIMEOUT_S, 0.2)
        )
        try:
            with pytest.raises(InvokeError, match=r"no response within 0\.2 s"):
                client.post({"prompt": "a cat"})
        finally:
            release.set()


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(base_delay_s=1, max_delay_s=8, random=lambda: 1.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 8]
    assert RetryPolicy(random=lambda: 0.25).delay(3) == 1.0
    assert RetryPolicy(random=lambda: 0.0).delay(1, retry_after=3) == 3  # Retry-After is honoured


class RecordingSession:
    """A requests.Session stand-in that records what ``post`` was given and answers 200."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def post(self, url: str, **kwargs: object) -> requests.Response:
        self.calls.append({"url": url, **kwargs})
        response = requests.Response()
        response.status_code, response._content = 200, PNG
        response.headers.update(IMAGE_HEADERS)
        return response


def test_requests_use_the_default_timeouts() -> None:
    session = RecordingSession()
    result = generate("https://abc.lambda-url.eu-west-1.on.aws/", "a cat", session=session, retry=instant())
    assert result.image == PNG
    assert session.calls[0]["timeout"] == (10.0, 900.0) == (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    assert session.calls[0]["allow_redirects"] is False


def test_plain_http_is_only_for_loopback() -> None:
    for url in ("http://abc.lambda-url.eu-west-1.on.aws/", "http://10.0.0.5:8080/", "http://example.com/"):
        with pytest.raises(InvokeError, match="refusing http://"):
            FunctionUrlClient(url, region=REGION)
    for url in ("http://127.0.0.1:8080/", "http://localhost:9000/", "http://[::1]:80/", "http://127.8.0.1/"):
        assert FunctionUrlClient(url, region=REGION).region == REGION


def test_non_finite_numbers_are_refused_before_sending() -> None:
    session = RecordingSession()
    with pytest.raises(InvokeError, match="NaN or infinity"):
        generate(
            "https://abc.lambda-url.eu-west-1.on.aws/", "x", guidance_scale=float("nan"), session=session
        )
    assert session.calls == []


# ---- inputs ----------------------------------------------------------------------------------------


def test_region_is_parsed_from_function_urls() -> None:
    assert region_from_url("https://abcdef123.lambda-url.eu-west-1.on.aws/") == "eu-west-1"
    assert region_from_url("https://x9.lambda-url.us-gov-west-1.on.aws") == "us-gov-west-1"
    assert region_from_url("https://example.com/") is None
    with pytest.raises(InvokeError, match="pass --region"):
        FunctionUrlClient("https://example.com/")


def test_missing_credentials_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setattr("botocore.credentials.ContainerProvider.load", lambda self: None)
    with pytest.raises(InvokeError, match="no AWS credentials found"):
        FunctionUrlClient("https://abc.lambda-url.eu-west-1.on.aws/")


def test_unknown_request_field_is_refused() -> None:
    with pytest.raises(InvokeError, match="unknown request field"):
        generate("https://abc.lambda-url.eu-west-1.on.aws/", "x", steps=3)


def test_server_timing_parsing_ignores_junk() -> None:
    assert parse_server_timing("load;dur=1.5, junk, bad;dur=x, inference;desc=a;dur=2") == {
        "load": 1.5,
        "inference": 2.0,
    }


# ---- sd-lambda generate ----------------------------------------------------------------------------


def test_cli_saves_the_image_and_prints_seed_and_timings(
    server: SigV4Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.replies.append(Reply(200, PNG, IMAGE_HEADERS))
    out = tmp_path / "images" / "cube.png"
    code = main(
        [
            "generate",
            "--url",
            server.url,
            "--region",
            REGION,
            "--prompt",
            "a cube",
            "--steps",
            "2",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    assert out.read_bytes() == PNG
    printed = capsys.readouterr().out
    assert "seed 7" in printed
    assert "inference 800.1 ms" in printed
    assert "test--tiny-sd@r1" in printed
    assert json.loads(server.received[0].body) == {"prompt": "a cube", "num_inference_steps": 2}


def test_cli_asks_for_json_for_several_images_and_writes_one_file_each(
    server: SigV4Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import base64

    second = PNG + b"-second"
    reply = {
        "images": [
            {"image": base64.b64encode(PNG).decode(), "seed": 7},
            {"image": base64.b64encode(second).decode(), "seed": 8},
        ],
        "format": "png",
        "content_type": "image/png",
        "seed": 7,
        "model": {"name": "test--tiny-sd", "revision": "r1"},
        "timings": {"load": 0.0, "inference": 1600.2},
        "request_id": "req-2",
    }
    server.replies.append(json_reply(200, reply))
    start = tmp_path / "start.jpg"
    start.write_bytes(b"jpeg bytes")
    out = tmp_path / "cube.png"
    argv = ["generate", "--url", server.url, "--region", REGION, "--prompt", "a cube", "-o", str(out)]
    extra = ["--num-images", "2", "--init-image", str(start), "--strength", "0.5", "--lora", "style=0.7"]
    assert main([*argv, *extra]) == 0
    assert (out.read_bytes(), (tmp_path / "cube-1.png").read_bytes()) == (PNG, second)
    sent = server.received[0]
    assert sent.headers["accept"] == "application/json"
    assert json.loads(sent.body) == {
        "prompt": "a cube",
        "num_images": 2,
        "init_image": base64.b64encode(b"jpeg bytes").decode(),
        "strength": 0.5,
        "loras": [{"name": "style", "scale": 0.7}],
    }
    printed = capsys.readouterr().out
    assert "seeds 7, 8" in printed
    assert "inference 1600.2 ms" in printed
    assert f"wrote {tmp_path / 'cube-1.png'}" in printed


def test_cli_refuses_an_unreadable_init_image_in_one_line(
    server: SigV4Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--url", server.url, "--region", REGION, "--prompt", "a cube"]
    with pytest.raises(SystemExit):
        main([*argv, "--init-image", str(tmp_path / "missing.png")])
    err = capsys.readouterr().err
    assert "argument --init-image: cannot read" in err
    assert "Traceback" not in err
    assert server.received == []


def test_cli_errors_are_one_line(
    server: SigV4Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.replies.append(json_reply(403, {"Message": "Forbidden"}))
    out = tmp_path / "never.png"
    code = main(["generate", "--url", server.url, "--region", REGION, "--prompt", "x", "-o", str(out)])
    progress, error = capsys.readouterr().err.splitlines()
    assert code == 1
    assert progress.startswith(f"==> POST {server.url}")  # the wait's progress line, before the request
    assert error.startswith("sd-lambda generate: error: HTTP 403 Forbidden: Forbidden; the caller needs both")
    assert not out.exists()


def test_cli_reports_a_format_fallback(
    server: SigV4Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.replies.append(
        Reply(
            200,
            b"\xff\xd8jpeg",
            {**IMAGE_HEADERS, "content-type": "image/jpeg", "x-image-fallback": "png->jpeg"},
        )
    )
    out = tmp_path / "big.png"
    assert main(["generate", "--url", server.url, "--region", REGION, "--prompt", "x", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "image/jpeg" in captured.out
    assert "re-encoded the image (png->jpeg)" in captured.err


def test_cli_reads_the_url_from_the_stack(
    server: SigV4Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sd_lambda.ops import stack_outputs

    asked: list[tuple[Path, tuple[str, ...]]] = []

    def outputs(infra: Path, required: tuple[str, ...] = ()) -> dict[str, str]:
        asked.append((infra, tuple(required)))
        return {"function_url": server.url}

    monkeypatch.setattr(stack_outputs, "read_outputs", outputs)
    server.replies.append(Reply(200, PNG, IMAGE_HEADERS))
    out = tmp_path / "x.png"
    assert main(["generate", "--infra", "infra", "--region", REGION, "--prompt", "x", "-o", str(out)]) == 0
    assert asked == [(Path("infra"), ("function_url",))]
    assert out.read_bytes() == PNG

    def no_outputs(infra: Path, required: tuple[str, ...] = ()) -> dict[str, str]:
        raise stack_outputs.NoOutputsError(
            "the stack in infra has no outputs: deploy it first (`make apply`)"
        )

    monkeypatch.setattr(stack_outputs, "read_outputs", no_outputs)
    capsys.readouterr()
    assert main(["generate", "--infra", "infra", "--prompt", "x", "-o", str(tmp_path / "y.png")]) == 1
    assert capsys.readouterr().err == (
        "sd-lambda generate: error: the stack in infra has no outputs: deploy it first (`make apply`) "
        "(or pass --url)\n"
    )


@pytest.mark.parametrize("value", ["nan", "inf", "Infinity", "lots"])
def test_cli_refuses_non_finite_guidance_in_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = "https://a.lambda-url.eu-west-1.on.aws/"
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--url", url, "--prompt", "x", "--guidance", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --guidance: {value!r} is not a" in err
    assert "Traceback" not in err


def test_cli_options_are_the_request_fields() -> None:
    import argparse

    from sd_lambda.engine.generation import DECODERS, MEDIA_TYPES, SCHEDULERS
    from sd_lambda.ops.client import register
    from sd_lambda.serving.request import GenerationRequest

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    generate_parser = parser._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    actions = {action.dest: action for action in generate_parser._actions}
    assert set(GenerationRequest.model_fields) <= set(actions)
    assert tuple(actions["scheduler"].choices) == tuple(SCHEDULERS)
    assert tuple(actions["decoder"].choices) == DECODERS
    assert tuple(actions["output_format"].choices) == tuple(MEDIA_TYPES)
    assert actions["prompt"].required
    assert actions["num_inference_steps"].option_strings == ["--steps"]
    assert actions["num_inference_steps"].type is int


def test_client_and_request_model_import_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sd_lambda.ops.client, sd_lambda.serving.request; "
        "heavy = sorted({'torch', 'diffusers', 'PIL'} & set(sys.modules)); "
        "print(heavy); sys.exit(bool(heavy))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_cli_refuses_an_empty_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--url", "https://a.lambda-url.eu-west-1.on.aws/", "--prompt", " "]) == 1
    assert 'the prompt is empty: pass --prompt "a red fox"' in capsys.readouterr().err


def test_session_token_is_sent_and_signed(server: SigV4Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporary credentials (SSO, assumed roles): the token travels as a signed header."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "test-session-token")
    server.replies.append(Reply(200, PNG, IMAGE_HEADERS))
    generate(server.url, "a cat", region=REGION, retry=instant())
    received = server.received[0]
    assert received.verdict == "ok"
    assert received.headers["x-amz-security-token"] == "test-session-token"
    assert "x-amz-security-token" in received.headers["authorization"]


def test_cli_json_prints_one_document_and_nothing_else_on_stdout(
    server: SigV4Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.replies.append(Reply(200, PNG, IMAGE_HEADERS))
    out = tmp_path / "cube.png"
    argv = [
        "generate",
        "--url",
        server.url,
        "--region",
        REGION,
        "--prompt",
        "a cube",
        "-o",
        str(out),
        "--json",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)  # the whole of stdout is one JSON document
    assert document["image"] == str(out)
    assert document["url"] == server.url
    assert document["seed"] == 7
    assert document["timings_ms"]["inference"] == 800.1
    assert (document["model"], document["revision"]) == ("test--tiny-sd", "r1")
    assert document["bytes"] == len(PNG) == out.stat().st_size
    assert f"==> POST {server.url}" in captured.err  # the human lines went to stderr
