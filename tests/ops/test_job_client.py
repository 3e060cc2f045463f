"""``sd-lambda generate --job``: submit, poll with capped exponential backoff, download through the
presigned URLs. The function URL is the local SigV4 server; the images come from moto's S3 server
through real presigned URLs; nothing sleeps (the sleeper and the clock are injected)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from helpers import FakeClock
from moto.server import ThreadedMotoServer

from sd_lambda.cli import main
from sd_lambda.ops import job_client
from sd_lambda.ops.client import InvokeError, RetryPolicy
from sd_lambda.ops.job_client import PollPolicy, run_job

from .sigv4_server import ACCESS_KEY, SECRET_KEY, SigV4Server, json_reply
from .test_client import test_credentials  # noqa: F401  (autouse: the server's known credentials)

JOB_ID = "0123456789abcdef0123456789abcdef"
BUCKET = "jobs-bucket"
IMAGES = [b"\x89PNG\r\n\x1a\nfirst", b"\x89PNG\r\n\x1a\nsecond"]


@pytest.fixture(scope="module")
def image_urls() -> Iterator[list[str]]:
    """Presigned GET URLs of two objects in moto's S3 server, as the function hands them out."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://{host}:{port}",
            region_name="eu-west-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        urls = []
        for index, data in enumerate(IMAGES):
            key = f"jobs/caller/{JOB_ID}/image-{index}.png"
            s3.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="image/png")
            urls.append(
                s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=300)
            )
        yield urls
    finally:
        server.stop()


@pytest.fixture
def server() -> Iterator[SigV4Server]:
    with SigV4Server() as running:
        yield running


def generate_job(server: SigV4Server, *flags: str) -> int:
    """``sd-lambda generate --job`` against the local function URL."""
    return main(
        ["generate", "--url", server.url, "--region", "eu-west-1", "--prompt", "a fox", "--job", *flags]
    )


def queued() -> Any:
    return json_reply(202, {"job_id": JOB_ID, "status": "queued", "status_url": f"/jobs/{JOB_ID}"})


def status(state: str, **fields: Any) -> Any:
    return json_reply(200, {"job_id": JOB_ID, "status": state, **fields})


def done(urls: list[str]) -> Any:
    return status(
        "done",
        images=[
            {"url": url, "seed": 7 + index, "bytes": len(IMAGES[index])} for index, url in enumerate(urls)
        ],
        content_type="image/png",
        model={"name": "test--tiny-sd", "revision": "r1"},
        timings={"load": 0.0, "inference": 812.5},
        run_request_id="run-1",
    )


def test_submit_poll_with_capped_backoff_and_download(server: SigV4Server, image_urls: list[str]) -> None:
    server.replies = [queued(), *(status("running") for _ in range(4)), done(image_urls)]
    fake = FakeClock()
    lines: list[str] = []
    response = run_job(
        server.url,
        {"prompt": "a fox", "num_inference_steps": 40},
        region="eu-west-1",
        poll=PollPolicy(first_delay_s=2, max_delay_s=5, sleep=fake.sleep, clock=fake),
        progress=lines.append,
    )
    assert fake.sleeps == [2, 4, 5, 5]  # doubling, capped
    assert [r.verdict for r in server.received] == ["ok"] * 6  # every call SigV4-signed and accepted
    submit, *polls = server.received
    assert (submit.method, submit.path) == ("POST", "/jobs")
    assert json.loads(submit.body) == {"prompt": "a fox", "num_inference_steps": 40}
    assert {(p.method, p.path) for p in polls} == {("GET", f"/jobs/{JOB_ID}")}
    assert response.images == tuple(IMAGES)
    assert response.seeds == (7, 8)
    assert (response.model, response.revision, response.request_id) == ("test--tiny-sd", "r1", "run-1")
    assert response.timings_ms == {"load": 0.0, "inference": 812.5}
    assert lines[0].startswith(f"job {JOB_ID} queued")
    assert lines[-1] == f"job {JOB_ID}: done after 16 s"


def test_a_failed_job_raises_with_its_code_and_status(server: SigV4Server) -> None:
    error = {"code": "model_not_found", "message": "no model", "field": None}
    server.replies = [queued(), status("failed", error=error, http_status=503)]
    with pytest.raises(InvokeError) as caught:
        run_job(server.url, {"prompt": "a fox"}, region="eu-west-1", poll=PollPolicy(sleep=FakeClock().sleep))
    assert str(caught.value) == f"job {JOB_ID} failed: model_not_found: no model"
    assert caught.value.status == 503


def test_the_total_timeout_stops_waiting_and_names_the_job(server: SigV4Server) -> None:
    server.default_reply = status("running")
    server.replies = [queued()]
    fake = FakeClock()
    with pytest.raises(InvokeError) as caught:
        run_job(
            server.url,
            {"prompt": "a fox"},
            region="eu-west-1",
            poll=PollPolicy(first_delay_s=1, max_delay_s=4, timeout_s=10, sleep=fake.sleep, clock=fake),
        )
    assert sum(fake.sleeps) <= 10
    assert fake.sleeps == [1, 2, 4]
    assert f"job {JOB_ID} is still running" in str(caught.value)
    assert f"/jobs/{JOB_ID}" in str(caught.value)


def test_a_throttled_poll_is_retried_like_a_call(server: SigV4Server, image_urls: list[str]) -> None:
    server.replies = [queued(), json_reply(429, {"Message": "Rate exceeded"}), done(image_urls)]
    retry_sleeps: list[float] = []
    response = run_job(
        server.url,
        {"prompt": "a fox"},
        region="eu-west-1",
        retry=RetryPolicy(sleep=retry_sleeps.append, random=lambda: 0.5),
        poll=PollPolicy(sleep=FakeClock().sleep),
    )
    assert retry_sleeps == [0.5]
    assert response.images == tuple(IMAGES)


def test_cli_job_writes_every_image_and_prints_progress(
    server: SigV4Server,
    image_urls: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeClock()
    monkeypatch.setattr(job_client, "PollPolicy", functools.partial(PollPolicy, sleep=fake.sleep))
    server.replies = [queued(), status("running"), done(image_urls)]
    out = tmp_path / "fox.png"
    code = generate_job(server, "-o", str(out))
    assert code == 0
    assert out.read_bytes() == IMAGES[0]
    assert (tmp_path / "fox-1.png").read_bytes() == IMAGES[1]
    err = capsys.readouterr().err
    assert f"... job {JOB_ID}: running after" in err
    assert fake.sleeps == [2.0]


def test_cli_failed_job_is_one_line_and_non_zero(
    server: SigV4Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.replies = [queued(), status("failed", error={"code": "invalid_value", "message": "bad"})]
    code = generate_job(server, "-o", str(tmp_path / "x.png"))
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert f"job {JOB_ID} failed: invalid_value: bad" in err


def test_cli_refuses_a_non_positive_job_timeout(
    server: SigV4Server, capsys: pytest.CaptureFixture[str]
) -> None:
    code = generate_job(server, "--job-timeout", "0")
    assert code == 1
    assert "--job-timeout must be a positive number" in capsys.readouterr().err
    assert server.received == []


def test_a_poll_that_times_out_is_retried_then_one_error_not_a_traceback() -> None:
    import requests

    from sd_lambda.ops.client import FunctionUrlClient
    from sd_lambda.ops.job_client import signed_get

    class TimingOut:
        calls = 0

        def get(self, *args: Any, **kwargs: Any) -> Any:
            TimingOut.calls += 1
            raise requests.exceptions.ReadTimeout("read timed out")

    client = FunctionUrlClient(
        "http://127.0.0.1:9/",
        region="eu-west-1",
        retry=RetryPolicy(attempts=2, sleep=lambda seconds: None),
        session=TimingOut(),
    )
    with pytest.raises(InvokeError, match="read timed out"):
        signed_get(client, "http://127.0.0.1:9/jobs/" + JOB_ID)
    assert TimingOut.calls == 2
