"""A local S3 (moto's server on 127.0.0.1) and the seeder's program run with the seeder's Python."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sysconfig
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from sd_lambda.layout import MANIFEST, Manifest
from sd_lambda.seeding.efs_sync import RESULT_PREFIX
from sd_lambda.seeding.payload import write_program

REGION = "us-east-1"
# The seeder runs Amazon Linux 2023, whose python3 is 3.9: the program must run there.
SEEDER_PYTHON_VERSION = (3, 9)


def _find_seeder_python() -> str:
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [
        os.environ.get("SD_LAMBDA_SEEDER_PYTHON"),
        shutil.which("python3.9"),
        *sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.9*", "bin", "python3.9"))),
    ]
    check = f"import sys; sys.exit(sys.version_info[:2] != {SEEDER_PYTHON_VERSION!r})"
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", check], capture_output=True).returncode == 0:
            return candidate
    pytest.fail(
        "no Python 3.9 found (the seeder's python3 on Amazon Linux 2023): install one "
        "(pyenv install 3.9) or set SD_LAMBDA_SEEDER_PYTHON"
    )


@pytest.fixture(scope="session")
def seeder_python() -> str:
    return _find_seeder_python()


@pytest.fixture(scope="session")
def aws_cli() -> str:
    """The AWS CLI the seeder's program calls (Amazon Linux 2023 ships v2; the dev extra installs v1, whose
    ``aws s3 cp`` is the same and which honours AWS_ENDPOINT_URL too)."""
    found = Path(sysconfig.get_path("scripts")) / "aws"
    if not os.access(found, os.X_OK):
        pytest.fail(f"no AWS CLI at {found}: install the dev extra (pip install -e '.[dev]', awscli)")
    return str(found)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


@dataclass
class Bucket:
    """One fresh bucket on the local S3, and helpers to put revisions into it."""

    name: str
    client: Any

    def put_folder(self, folder: Path, name: str, revision: str, *, skip: str | None = None) -> str:
        """Upload ``folder`` and its manifest as ``models/<name>/<revision>/``; returns the manifest sha."""
        manifest = Manifest.build(folder, source=str(folder))
        prefix = f"models/{name}/{revision}/"
        for entry in manifest.files:
            if entry.path != skip:
                self.client.upload_file(str(folder / entry.path), self.name, prefix + entry.path)
        return self.put_manifest(prefix, manifest.to_json())

    def put_manifest(self, prefix: str, text: str) -> str:
        self.client.put_object(Bucket=self.name, Key=prefix + MANIFEST, Body=text.encode())
        return hashlib.sha256(text.encode()).hexdigest()

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)


@pytest.fixture
def bucket(s3_endpoint: str, aws_env: dict[str, str]) -> Bucket:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)
    name = f"weights-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(name, client)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        lines = [line for line in self.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        assert lines, f"no result line; stderr:\n{self.stderr}"
        return json.loads(lines[-1][len(RESULT_PREFIX) :])


@dataclass
class SeederProgram:
    """Runs the exact bytes the driver ships, with the seeder's Python, against the local S3."""

    python: str
    program: Path
    env: dict[str, str]
    mount: Path
    bucket: str

    def argv(self, command: str, name: str, revision: str, *extra: str) -> list[str]:
        argv = [self.python, str(self.program), command, "--mount", str(self.mount)]
        argv += ["--name", name, "--revision", revision]
        if command == "sync":
            argv += ["--bucket", self.bucket, "--s3-prefix", f"models/{name}/{revision}/"]
            argv += ["--owner", f"{os.getuid()}:{os.getgid()}"]
        return argv + list(extra)

    def run(self, command: str, name: str, revision: str, *extra: str) -> Outcome:
        done = subprocess.run(
            self.argv(command, name, revision, *extra),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return Outcome(done.returncode, done.stdout, done.stderr)

    def start(self, command: str, name: str, revision: str, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(command, name, revision, *extra),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def seeder_env(
    tmp_path: Path, aws_cli: str | None, s3_endpoint: str, aws_env: dict[str, str]
) -> dict[str, str]:
    """The environment the program (and the AWS CLI it runs) sees: ``aws`` on PATH unless ``aws_cli`` is
    None, the local S3 as endpoint, test keys, and nothing from this machine's AWS config or its IMDS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if aws_cli is not None and not (bin_dir / "aws").exists():
        (bin_dir / "aws").symlink_to(aws_cli)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        **aws_env,
    }


@pytest.fixture
def seeder(
    tmp_path: Path,
    seeder_python: str,
    aws_cli: str,
    s3_endpoint: str,
    aws_env: dict[str, str],
    bucket: Bucket,
) -> SeederProgram:
    mount = tmp_path / "efs"
    mount.mkdir()
    env = seeder_env(tmp_path, aws_cli, s3_endpoint, aws_env)
    program = write_program(tmp_path / "efs-sync.pyz")
    return SeederProgram(seeder_python, program, env, mount, bucket.name)


def make_model(folder: Path, tag: str, files: int = 3) -> Path:
    """A small diffusers-shaped folder whose weights differ by ``tag``."""
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for index in range(files):
        payload = hashlib.sha256(f"{tag}-{index}".encode()).digest() * (64 * (index + 1))
        (folder / "unet" / f"part{index}.safetensors").write_bytes(payload)
    return folder
