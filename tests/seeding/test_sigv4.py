"""The seeder program's tiny S3 client: its signatures equal botocore's; credentials come via IMDSv2."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from sd_lambda.seeding.efs_sync import CredentialChain, Credentials, S3Reader, SyncError, sign_s3_get

NOW = datetime(2026, 11, 22, 1, 2, 3, tzinfo=timezone.utc)  # noqa: UP017 (the module under test is 3.9)


@pytest.mark.parametrize("token", [None, "session-token"])
@pytest.mark.parametrize(
    "url",
    [
        "https://weights.s3.eu-west-1.amazonaws.com/models/acme--tiny-sd/r1/unet/diffusion_pytorch_model.safetensors",
        "http://127.0.0.1:5000/my.bucket/models/a%20b/r1/model_index.json",
        "https://s3.eu-west-1.amazonaws.com/b/k?versionId=abc&x-id=GetObject",
    ],
)
def test_signature_matches_botocore(url: str, token: str | None) -> None:
    ours = sign_s3_get(url, Credentials("AKIDEXAMPLE", "secret/key+", token), "eu-west-1", NOW)
    request = AWSRequest(
        method="GET", url=url, headers={"x-amz-content-sha256": ours["x-amz-content-sha256"]}
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        S3SigV4Auth(BotoCredentials("AKIDEXAMPLE", "secret/key+", token), "s3", "eu-west-1").add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]


def test_addressing_styles() -> None:
    chain = CredentialChain({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    assert S3Reader("weights", "eu-west-1", chain, None).url("models/a b") == (
        "https://weights.s3.eu-west-1.amazonaws.com/models/a%20b"
    )
    assert S3Reader("my.weights", "eu-west-1", chain, None).url("k") == (
        "https://s3.eu-west-1.amazonaws.com/my.weights/k"
    )
    assert (
        S3Reader("weights", "eu-west-1", chain, "http://127.0.0.1:9/").url("k")
        == "http://127.0.0.1:9/weights/k"
    )


class FakeImds(BaseHTTPRequestHandler):
    """IMDSv2 only: a PUT for a token, then GETs that must carry it."""

    token = "imds-token"
    requests: list[str] = []

    def do_PUT(self) -> None:
        self.requests.append(f"PUT {self.path}")
        assert self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        self._send(self.token)

    def do_GET(self) -> None:
        self.requests.append(f"GET {self.path}")
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self.send_response(401)
            self.end_headers()
            return
        documents = {
            "/latest/meta-data/iam/security-credentials/": "seeder-role",
            "/latest/meta-data/iam/security-credentials/seeder-role": json.dumps(
                {
                    "AccessKeyId": "ASIAEXAMPLE",
                    "SecretAccessKey": "secret",
                    "Token": "session",
                    "Expiration": "2099-01-01T00:00:00Z",
                }
            ),
            "/latest/meta-data/placement/region": "eu-central-1",
        }
        self._send(documents[self.path])

    def _send(self, body: str) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def imds() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeImds.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_instance_profile_credentials_via_imdsv2(imds: str) -> None:
    chain = CredentialChain({"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds})
    credentials = chain.get()
    assert (credentials.access_key, credentials.secret_key, credentials.token) == (
        "ASIAEXAMPLE",
        "secret",
        "session",
    )
    assert chain.region() == "eu-central-1"
    chain.get()  # cached until close to expiry
    assert FakeImds.requests.count("GET /latest/meta-data/iam/security-credentials/seeder-role") == 1
    assert FakeImds.requests[0] == "PUT /latest/api/token"


def test_no_credentials_is_one_line() -> None:
    chain = CredentialChain({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9"})
    with pytest.raises(
        SyncError, match="no AWS credentials: none in the environment and no instance profile"
    ):
        chain.get()


class FlakyS3(BaseHTTPRequestHandler):
    """One object; answers per a script: 503 SlowDown, a body cut short, then honest (ranged) GETs."""

    body = bytes(range(256)) * 40
    script: list[str] = []
    ranges: list[str | None] = []

    def do_GET(self) -> None:
        action = self.script.pop(0) if self.script else "ok"
        self.ranges.append(self.headers.get("Range"))
        if action in ("503", "403"):
            error = (
                f"<Error><Code>{'SlowDown' if action == '503' else 'AccessDenied'}</Code></Error>".encode()
            )
            self.send_response(int(action))
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        payload = self.body[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if action == "cut":
            self.wfile.write(payload[: len(payload) // 3])
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def test_download_retries_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from sd_lambda.layout import ManifestEntry
    from sd_lambda.seeding import efs_sync

    monkeypatch.setattr(efs_sync, "BACKOFF_S", 0.0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FlakyS3.script, FlakyS3.ranges = ["503", "cut"], []
    try:
        chain = CredentialChain({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
        reader = S3Reader("weights", "eu-west-1", chain, f"http://127.0.0.1:{server.server_address[1]}")
        entry = ManifestEntry("w.safetensors", len(FlakyS3.body), hashlib.sha256(FlakyS3.body).hexdigest())
        transferred = reader.download("k", tmp_path / "w.safetensors", entry)
    finally:
        server.shutdown()
        thread.join()
    assert (tmp_path / "w.safetensors").read_bytes() == FlakyS3.body
    assert transferred == len(FlakyS3.body)
    cut_at = len(FlakyS3.body) // 3
    assert FlakyS3.ranges == [None, None, f"bytes={cut_at}-"]  # resumed where the cut body ended
    assert not (tmp_path / "w.safetensors.part").exists()


def test_access_denied_names_the_seeder_permission(tmp_path: Path) -> None:
    from sd_lambda.layout import ManifestEntry

    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FlakyS3.script, FlakyS3.ranges = ["403"], []
    try:
        chain = CredentialChain({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
        reader = S3Reader("weights", "eu-west-1", chain, f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(SyncError) as caught:
            reader.download("models/k", tmp_path / "w", ManifestEntry("w", 1, "0" * 64))
    finally:
        server.shutdown()
        thread.join()
    assert str(caught.value).startswith(
        "AccessDenied reading s3://weights/models/k: the seeder's role needs s3:GetObject"
    )
    assert FlakyS3.ranges == [None]  # not retried
