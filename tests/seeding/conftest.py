"""A local S3 (moto's server on 127.0.0.1) and the seeder's program run with the seeder's Python; a local
AWS (moto's S3, EC2, IAM and SSM, with a stand-in SSM agent) for the driver end to end."""

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
from botocore.stub import Stubber
from moto.server import ThreadedMotoServer

from sd_lambda.layout import MANIFEST, Manifest
from sd_lambda.seeding import flow
from sd_lambda.seeding.efs_sync import FIRST_BOOT_STOP, PROGRESS_DIR, RESULT_PREFIX, SEED_MARKER
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


AMI_ID = "ami-12c6146b"  # one of the images moto knows


class LocalAgent:
    """moto's SSM, plus an agent that runs what moto recorded, here, and reports like SSM does."""

    def __init__(self, ssm: Any, env: dict[str, str], instance_id: str, run_dir: Path) -> None:
        self.ssm = ssm
        self.env = env
        self.run_dir = run_dir  # stands in for the seeder's /run: never the test machine's own
        self.invocations: dict[str, dict[str, Any]] = {}
        self.scripts: list[list[str]] = []
        self.online = boto3.client("ssm", region_name=REGION)
        self.stub = Stubber(self.online)
        self.instance_id = instance_id

    def describe_instance_information(self, **kwargs: Any) -> Any:
        found = {"InstanceInformationList": [{"InstanceId": self.instance_id, "PingStatus": "Online"}]}
        self.stub.add_response("describe_instance_information", found, kwargs)
        with self.stub:
            return self.online.describe_instance_information(**kwargs)

    def send_command(self, **kwargs: Any) -> Any:
        sent = self.ssm.send_command(**kwargs)
        command_id = sent["Command"]["CommandId"]
        (recorded,) = self.ssm.list_commands(CommandId=command_id)["Commands"]
        lines = recorded["Parameters"]["commands"]
        # What the agent gets is a short script: the program itself comes from S3.
        assert len("\n".join(lines).encode()) < 2048
        # The one adaptation: the temp "EFS" is not a mount point (test_efs_sync covers the refusal).
        if kwargs["Comment"].startswith("sd-lambda mount check "):  # test_preflight covers its refusals
            script = "\n".join(lines).replace("mountpoint -q ", "test -d ")
            for absolute in (SEED_MARKER, FIRST_BOOT_STOP):
                script = script.replace(absolute, str(self.run_dir / Path(absolute).name))
        else:
            self.scripts.append(lines)
            assert " --require-mount --mount-wait 300 " in lines[-1]
            script = "\n".join(lines).replace(" --require-mount --mount-wait 300 ", " ")
            script = script.replace(PROGRESS_DIR + "/", f"{self.run_dir}/")
        done = subprocess.run(
            ["/bin/sh", "-c", script], env=self.env, capture_output=True, text=True, timeout=120
        )
        self.invocations[command_id] = {
            "Status": "Success" if done.returncode == 0 else "Failed",
            "ResponseCode": done.returncode,
            "StandardOutputContent": done.stdout,
            "StandardErrorContent": done.stderr,
        }
        return sent

    def get_command_invocation(self, CommandId: str, InstanceId: str) -> Any:
        assert InstanceId == self.instance_id
        return self.invocations[CommandId]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ssm, name)


@pytest.fixture
def local_aws(
    seeder: SeederProgram, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[LocalAgent, list[str]]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    ec2 = boto3.client("ec2", region_name=REGION)
    iam = boto3.client("iam", region_name=REGION)
    profile = f"seeder-{tmp_path.name}"
    iam.create_role(RoleName=profile, AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName=profile)
    iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=profile)
    instance_id = ec2.run_instances(
        ImageId=AMI_ID, MinCount=1, MaxCount=1, IamInstanceProfile={"Name": profile}
    )["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[instance_id])

    bin_dir = tmp_path / "agent-bin"  # the seeder's python3 (its aws: the seeder fixture's PATH)
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(seeder.python)
    env = {**seeder.env, "PATH": f"{bin_dir}{os.pathsep}{seeder.env['PATH']}"}
    (tmp_path / "run").mkdir()
    agent = LocalAgent(boto3.client("ssm", region_name=REGION), env, instance_id, tmp_path / "run")
    real_create = flow.AwsClients.create

    def create(region: str | None) -> flow.AwsClients:
        clients = real_create(region)
        return flow.AwsClients(clients.s3, clients.ec2, agent, sts=clients.sts)

    monkeypatch.setattr(flow.AwsClients, "create", create)
    stack = ["--bucket", seeder.bucket, "--instance-id", instance_id, "--region", REGION]
    return agent, [*stack, "--mount-path", str(seeder.mount)]


def make_model(folder: Path, tag: str, files: int = 3) -> Path:
    """A small diffusers-shaped folder whose weights differ by ``tag``."""
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for index in range(files):
        payload = hashlib.sha256(f"{tag}-{index}".encode()).digest() * (64 * (index + 1))
        (folder / "unet" / f"part{index}.safetensors").write_bytes(payload)
    return folder


# --- OpenVINO releases: the tiny test model exported once per session, through the driver's own export ----

EXPORT_PYTHON = Path(__file__).resolve().parents[2] / ".venv-export" / "bin" / "python"
# Enough UNet calls to calibrate every int8 range on the tiny model, few enough to take seconds.
TEST_CALIBRATION_SAMPLES = 8


@dataclass(frozen=True)
class OpenVINOExport:
    """A release converted by ``export_openvino`` under ``work_dir`` (a later run there reuses it)."""

    work_dir: Path
    release: Any  # sources.LocalRelease

    @property
    def folder(self) -> Path:
        return self.release.files["model_index.json"].parent


def _export(tiny_model_dir: Path, work_dir: Path, **options: Any) -> OpenVINOExport:
    from sd_lambda.seeding.openvino_release import ExportOptions, export_openvino
    from sd_lambda.seeding.sources import from_dir

    if not EXPORT_PYTHON.is_file():
        pytest.fail(f"no export venv at {EXPORT_PYTHON.parents[1]}: run make install-export")
    release = export_openvino(from_dir(tiny_model_dir), work_dir, ExportOptions(EXPORT_PYTHON, **options))
    return OpenVINOExport(work_dir, release)


@pytest.fixture(scope="session")
def openvino_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OpenVINOExport:
    return _export(tiny_model_dir, tmp_path_factory.mktemp("openvino-work"))


@pytest.fixture(scope="session")
def openvino_fp32_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OpenVINOExport:
    return _export(tiny_model_dir, tmp_path_factory.mktemp("openvino-fp32-work"), weight_format="fp32")


@pytest.fixture(scope="session")
def openvino_int8_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OpenVINOExport:
    work_dir = tmp_path_factory.mktemp("openvino-int8-work")
    return _export(tiny_model_dir, work_dir, quantize="int8", calibration_samples=TEST_CALIBRATION_SAMPLES)
