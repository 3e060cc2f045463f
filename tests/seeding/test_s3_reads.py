"""How the seeder's program reads S3: through the AWS CLI (the real one, run by the program under Python 3.9).

moto answers honestly, so the failures the CLI must cope with come from a scripted S3 on 127.0.0.1:
``AccessDenied`` everywhere, or one object that first answers 503 SlowDown and then a body cut short.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import urllib.parse
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sd_lambda.layout import MANIFEST, Manifest, ModelPaths, verify_release

from .conftest import Bucket, SeederProgram, make_model

NAME = "acme--tiny-sd"
FLAKY = "unet/part0.safetensors"


class ScriptedS3(BaseHTTPRequestHandler):
    """Path-style HEAD/GET of whole objects; ``deny`` answers 403 to everything; ``script`` lists what the
    next GETs of one key get instead of the object ('503', 'cut')."""

    objects: dict[str, bytes] = {}
    deny = False
    script: dict[str, list[str]] = {}
    gets: list[str] = []

    def _key(self) -> str:
        _, _, key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/").partition("/")
        return key

    def do_HEAD(self) -> None:
        key = self._key()
        if self.deny or key not in self.objects:
            self._status(403 if self.deny else 404, b"")
            return
        self._object_headers(200, len(self.objects[key]))

    def do_GET(self) -> None:
        key = self._key()
        self.gets.append(key)
        if self.deny:
            self._status(403, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>")
            return
        action = self.script.get(key, []).pop(0) if self.script.get(key) else "ok"
        if action == "503":
            self._status(
                503, b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
            )
            return
        body = self.objects[key]
        self._object_headers(200, len(body))
        if action == "cut":  # the connection drops a third of the way in
            self.wfile.write(body[: len(body) // 3])
            self.close_connection = True
            return
        self.wfile.write(body)

    def _object_headers(self, status: int, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.send_header("Last-Modified", formatdate(0, usegmt=True))
        self.end_headers()

    def _status(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if body:
            self.send_header("Content-Type", "application/xml")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted_s3(seeder: SeederProgram, tmp_path: Path) -> Iterator[SeederProgram]:
    """The seeder's program, pointed at a scripted S3 that holds one small model as ``r1``."""
    folder = make_model(tmp_path / "v1", "v1")
    manifest = Manifest.build(folder, source="test")
    prefix = f"models/{NAME}/r1/"
    ScriptedS3.objects = {prefix + e.path: (folder / e.path).read_bytes() for e in manifest.files}
    ScriptedS3.objects[prefix + MANIFEST] = manifest.to_json().encode()
    ScriptedS3.deny, ScriptedS3.script, ScriptedS3.gets = False, {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {**seeder.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}"}
    yield dataclasses.replace(seeder, env=env)
    server.shutdown()
    thread.join()


def test_access_denied_names_the_seeder_permission(scripted_s3: SeederProgram) -> None:
    ScriptedS3.deny = True
    outcome = scripted_s3.run("sync", NAME, "r1")
    assert outcome.returncode == 1
    (error,) = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    where = f"s3://{scripted_s3.bucket}/models/{NAME}/r1/{MANIFEST}"
    assert error.startswith(f"error: AccessDenied reading {where}: the seeder's role needs s3:GetObject")
    assert "[aws exit 1: " in error  # the AWS CLI's own words, on the same line
    assert "(403)" in error
    assert not ModelPaths(scripted_s3.mount / NAME).staging("r1").exists()


def test_transient_errors_are_retried_by_the_cli(scripted_s3: SeederProgram) -> None:
    key = f"models/{NAME}/r1/{FLAKY}"
    ScriptedS3.script = {key: ["503", "cut"]}
    outcome = scripted_s3.run("sync", NAME, "r1")
    assert outcome.returncode == 0, outcome.stderr
    assert ScriptedS3.script[key] == []  # both failures were served ...
    assert ScriptedS3.gets.count(key) == 3  # ... and the third GET succeeded
    paths = ModelPaths(scripted_s3.mount / NAME)
    verify_release(paths.resolve_current())
    served = ScriptedS3.objects[key]
    assert (
        hashlib.sha256((paths.resolve_current() / FLAKY).read_bytes()).digest()
        == hashlib.sha256(served).digest()
    )


def test_aws_cli_flag(seeder: SeederProgram, bucket: Bucket, aws_cli: str, tmp_path: Path) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    # No aws on PATH: only --aws-cli finds it.
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    bare = dataclasses.replace(seeder, env={**seeder.env, "PATH": str(empty)})
    missing = bare.run("sync", NAME, "r1")
    assert missing.returncode == 1
    assert (
        "error: cannot run the AWS CLI 'aws' (No such file or directory): install it or pass --aws-cli PATH"
        in (missing.stderr)
    )
    assert bare.run("sync", NAME, "r1", "--aws-cli", aws_cli).returncode == 0
    assert ModelPaths(seeder.mount / NAME).current_revision() == "r1"
