"""build-image / push-image: docker commands, ECR login, tagging, digest file (moto ECR, fake docker)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from sd_lambda.cli import main
from sd_lambda.ops.container import cli as container_cli
from sd_lambda.ops.container.docker import DockerFailed, DockerUnavailable, build_command
from sd_lambda.ops.container.registry import (
    GitState,
    PushError,
    Repository,
    ecr_login,
    git_state,
    image_tag,
    push,
    write_reference,
)

ROOT = Path(__file__).resolve().parents[2]
REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's default account
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 7,
            "digest": "sha256:" + "a" * 64,
        },
        "layers": [],
    }
)
# What BuildKit pushes with its default provenance attestation: an OCI index of the image + attestation.
ATTESTED_INDEX = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "d" * 64},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "e" * 64},
        ],
    }
)


class FakeDocker:
    """Records every docker command; ``push`` lands the image in (moto's) ECR like a registry would."""

    def __init__(
        self,
        ecr=None,
        engine: bool = True,
        push_lands: bool = True,
        buildx: bool = True,
        manifest: str = MANIFEST,
    ) -> None:
        self.ecr = ecr
        self.engine = engine
        self.push_lands = push_lands
        self.buildx = buildx
        self.manifest = manifest
        self.calls: list[tuple[list[str], str | None, dict[str, str]]] = []

    def __call__(
        self, args: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        args = list(args)
        self.calls.append((args, stdin, dict(env or {})))
        if args[0] == "version" and not self.engine:
            raise DockerFailed("docker version failed (exit 1): Cannot connect to the Docker daemon")
        if args[:2] == ["buildx", "version"] and not self.buildx:
            raise DockerFailed("docker buildx version failed (exit 1): 'buildx' is not a docker command")
        if args[0] == "login":
            assert Path(env["DOCKER_CONFIG"]).is_dir()  # a private config dir exists during login
        if args[0] == "push" and self.push_lands:
            repository, tag = args[1].split("/", 1)[1].rsplit(":", 1)
            self.ecr.put_image(repositoryName=repository, imageManifest=self.manifest, imageTag=tag)
        return ""

    def commands(self) -> list[list[str]]:
        return [args for args, _, _ in self.calls]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[object]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        ecr = boto3.client("ecr", region_name=REGION)
        ecr.create_repository(repositoryName="sd-lambda", imageTagMutability="IMMUTABLE")
        yield ecr


@pytest.fixture
def repository(aws) -> Repository:
    return Repository.parse(f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sd-lambda")


def test_push_logs_in_tags_pushes_and_returns_the_registry_digest(aws, repository: Repository) -> None:
    docker = FakeDocker(aws)
    result = push(docker, aws, "sd-lambda:local", repository, "git-0123456789ab")
    remote = f"{repository.url}:git-0123456789ab"
    commands = docker.commands()
    assert commands[0][0] == "version"
    assert ["image", "inspect", "--format", "{{.Id}}", "sd-lambda:local"] in commands
    login = next(call for call in docker.calls if call[0][0] == "login")
    assert login[0] == ["login", "--username", "AWS", "--password-stdin", repository.registry]
    assert login[1] == f"{ACCOUNT}-auth-token"  # the password travels on stdin, never on argv
    assert not Path(login[2]["DOCKER_CONFIG"]).exists()  # the token's config dir is gone afterwards
    assert commands[-2:] == [["tag", "sd-lambda:local", remote], ["push", remote]]
    described = aws.describe_images(repositoryName="sd-lambda", imageIds=[{"imageTag": "git-0123456789ab"}])
    digest = described["imageDetails"][0]["imageDigest"]
    assert result.reference == f"{repository.url}@{digest}"
    assert result.pushed


def test_already_pushed_commit_is_reused_not_pushed_again(aws, repository: Repository) -> None:
    first = push(FakeDocker(aws), aws, "sd-lambda:local", repository, "git-abc")
    again = FakeDocker(aws)
    second = push(again, aws, "sd-lambda:local", repository, "git-abc")
    assert second.reference == first.reference
    assert not second.pushed
    assert not [c for c in again.commands() if c[0] in ("login", "push")]


def test_push_that_never_reaches_ecr_is_an_error(aws, repository: Repository) -> None:
    with pytest.raises(PushError, match="ECR has no image tagged git-abc"):
        push(FakeDocker(aws, push_lands=False), aws, "sd-lambda:local", repository, "git-abc")


def test_missing_repository_is_explained(aws) -> None:
    missing = Repository.parse(f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/not-there")
    with pytest.raises(PushError, match="does not exist in eu-west-1: deploy the stack first"):
        push(FakeDocker(aws), aws, "sd-lambda:local", missing, "git-abc")


def test_ecr_login_decodes_the_authorization_token(aws, repository: Repository) -> None:
    login = ecr_login(aws, repository)
    assert (login.registry, login.username, login.password) == (
        f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com",
        "AWS",
        f"{ACCOUNT}-auth-token",
    )


def test_repository_url_parsing() -> None:
    parsed = Repository.parse(f"https://{ACCOUNT}.dkr.ecr.us-east-2.amazonaws.com/team/sd-lambda/")
    assert (parsed.account, parsed.region, parsed.name) == (ACCOUNT, "us-east-2", "team/sd-lambda")
    with pytest.raises(PushError, match="not an ECR repository URL"):
        Repository.parse("docker.io/library/python")


def test_tags_name_the_commit_and_mark_dirty_trees() -> None:
    clean = GitState("0123456789abcdef0123456789abcdef01234567", dirty=False)
    assert image_tag(clean) == "git-0123456789ab"
    dirty = GitState(clean.sha, dirty=True)
    assert image_tag(dirty, now=lambda: datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == (
        "git-0123456789ab-dirty-20260102T030405Z"
    )


def test_git_state_reads_the_checkout(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "one")
    state = git_state(tmp_path)
    assert len(state.sha) == 40
    assert not state.dirty
    (tmp_path / "a.txt").write_text("2")
    assert git_state(tmp_path).dirty


def test_digest_file_is_what_deploy_reads(tmp_path: Path) -> None:
    from sd_lambda.ops.deploy import read_digest

    reference = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sd-lambda@sha256:" + "b" * 64
    path = tmp_path / ".image-digest"
    write_reference(path, reference)
    assert path.read_text() == reference + "\n"
    assert read_digest(path) == "sha256:" + "b" * 64
    assert [p.name for p in tmp_path.iterdir()] == [".image-digest"]  # no temporary file left behind


def test_push_image_command_writes_the_digest_file(
    aws, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docker = FakeDocker(aws)
    monkeypatch.setattr(container_cli, "docker_cli", lambda binary: docker)
    digest_file = tmp_path / ".image-digest"
    repository_url = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sd-lambda"
    args = [
        "push-image",
        "--repository-url",
        repository_url,
        "--tag",
        "git-feed",
        "--digest-file",
        str(digest_file),
    ]
    assert main(args) == 0
    reference = digest_file.read_text().strip()
    assert reference.startswith(f"{repository_url}@sha256:")
    assert reference in capsys.readouterr().out


def test_push_image_without_docker_engine_is_one_line(
    aws, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(container_cli, "docker_cli", lambda binary: FakeDocker(aws, engine=False))
    repository_url = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sd-lambda"
    code = main(["push-image", "--repository-url", repository_url, "--digest-file", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert "Docker engine is not reachable" in err
    assert not (tmp_path / "d").exists()


def test_push_image_without_credentials_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # boto3's default session keeps the credentials an earlier test (moto's) resolved.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setattr(container_cli, "docker_cli", lambda binary: FakeDocker())
    url = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sd-lambda"
    assert main(["push-image", "--repository-url", url, "--digest-file", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err == (
        "sd-lambda push-image: error: no AWS credentials found: "
        "configure a profile, SSO or environment credentials\n"
    )


def test_build_command_targets_lambda_platforms_with_a_single_manifest() -> None:
    assert build_command("sd-lambda:local") == [
        "buildx",
        "build",
        "--load",
        "--provenance=false",
        "--sbom=false",
        "--platform",
        "linux/amd64",
        "--file",
        "image/Dockerfile",
        "--tag",
        "sd-lambda:local",
        ".",
    ]
    arm = build_command("x", platform="linux/arm64", build_args={"BASE_DIGEST": "sha256:" + "c" * 64})
    assert arm[5:7] == ["--platform", "linux/arm64"]
    assert arm[-3:-1] == ["--build-arg", "BASE_DIGEST=sha256:" + "c" * 64]
    with pytest.raises(ValueError, match="not one Lambda runs"):
        build_command("x", platform="linux/386")


@pytest.mark.parametrize(
    ("buildx", "builder"),
    [
        (True, ["buildx", "build", "--load", "--provenance=false", "--sbom=false"]),
        # The legacy builder knows no attestation flags and pushes a single v2 schema 2 manifest anyway.
        (False, ["build"]),
    ],
)
def test_build_image_command_runs_docker_build(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], buildx: bool, builder: list[str]
) -> None:
    docker = FakeDocker(buildx=buildx)
    monkeypatch.setattr(container_cli, "docker_cli", lambda binary: docker)
    monkeypatch.chdir(ROOT)
    assert main(["build-image", "--platform", "linux/arm64", "--tag", "sd:test"]) == 0
    built = docker.commands()[-1]
    assert built == build_command("sd:test", platform="linux/arm64", buildx=buildx)
    assert built[: len(builder) + 1] == [*builder, "--platform"]
    assert "built sd:test for linux/arm64" in capsys.readouterr().out


def test_push_of_an_image_index_is_refused_in_one_line(aws, repository: Repository) -> None:
    """Lambda runs a single image manifest only; ECR's imageManifestMediaType says what was stored."""
    with pytest.raises(PushError) as refused:
        push(FakeDocker(aws, manifest=ATTESTED_INDEX), aws, "sd-lambda:local", repository, "git-abc")

    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{repository.url}:git-abc is an image index")
    assert "which Lambda refuses: rebuild with `make build-image`" in message


def test_reused_image_index_is_refused_too(aws, repository: Repository) -> None:
    aws.put_image(repositoryName="sd-lambda", imageManifest=ATTESTED_INDEX, imageTag="git-abc")

    with pytest.raises(PushError, match=r"is an image index.*\(its tag is immutable: commit first or pass"):
        push(FakeDocker(aws), aws, "sd-lambda:local", repository, "git-abc")


def test_make_build_image_without_docker_fails_in_one_line() -> None:
    """The real Makefile target and the real docker runner: a missing docker CLI is a clear error."""
    completed = subprocess.run(
        ["make", "-s", "--no-print-directory", "build-image", "DOCKER=sd-lambda-test-no-such-docker"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "MAKEFLAGS": ""},
        check=False,
    )
    assert completed.returncode != 0
    ours = [line for line in completed.stderr.splitlines() if line.startswith("sd-lambda")]
    assert ours == [
        "sd-lambda build-image: error: sd-lambda-test-no-such-docker not found on PATH: building and pushing "
        "the image needs Docker (this machine has none; use a workstation or CI runner with a Docker engine)"
    ]


def test_docker_unavailable_is_raised_by_the_real_runner() -> None:
    from sd_lambda.ops.container.docker import DockerCLI, require_engine

    with pytest.raises(DockerUnavailable, match="not found on PATH"):
        require_engine(DockerCLI("sd-lambda-test-no-such-docker"))


@pytest.mark.parametrize(
    ("args", "streamed"),
    [
        (["build", "--tag", "x", "."], True),
        (["push", "repo:tag"], True),
        (["buildx", "build", "--load", "."], True),
        (["buildx", "version"], False),  # has_buildx reads it: captured, never on the terminal
        (["version", "--format", "{{.Server.Version}}"], False),
        (["image", "inspect", "x"], False),
        ([], False),
    ],
)
def test_the_real_runner_streams_exactly_build_push_and_buildx_build(
    monkeypatch: pytest.MonkeyPatch, args: list[str], streamed: bool
) -> None:
    from sd_lambda.ops.container import docker as docker_module

    captured: list[bool] = []

    def run(argv: list[str], **options: object) -> subprocess.CompletedProcess[str]:
        captured.append(bool(options["capture_output"]))
        return subprocess.CompletedProcess(argv, 0, stdout="", stderr="")

    monkeypatch.setattr(docker_module.shutil, "which", lambda binary: "/usr/bin/docker")
    monkeypatch.setattr(docker_module.subprocess, "run", run)

    docker_module.DockerCLI("docker", stream=True)(args)

    assert captured == [not streamed]


def test_a_failing_plugin_command_is_named_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    from sd_lambda.ops.container import docker as docker_module

    monkeypatch.setattr(docker_module.shutil, "which", lambda binary: "/usr/bin/docker")
    monkeypatch.setattr(
        docker_module.subprocess,
        "run",
        lambda argv, **_: subprocess.CompletedProcess(argv, 1, stdout="", stderr="ERROR: no builder\n"),
    )

    with pytest.raises(DockerFailed) as failed:
        docker_module.DockerCLI("docker", stream=False)(["buildx", "build", "."])

    assert str(failed.value) == "docker buildx build failed (exit 1): ERROR: no builder"


def test_a_baked_image_is_pushed_under_a_tag_naming_its_model(
    aws, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ECR tags are immutable: a commit's model-less and baked images must never share a tag."""
    from sd_lambda.ops.container import baked

    class Baked(FakeDocker):
        def __call__(self, args, *, stdin=None, env=None):  # type: ignore[no-untyped-def]
            output = super().__call__(args, stdin=stdin, env=env)
            if list(args[:2]) == ["image", "inspect"] and baked.MODEL_LABEL in " ".join(args):
                return "test--tiny-sd@r1\n"
            return output

    docker = Baked(aws)
    monkeypatch.setattr(container_cli, "docker_cli", lambda binary: docker)
    url = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sd-lambda"
    digest_file = tmp_path / "digest"
    argv = ["push-image", "--repository-url", url, "--tag", "git-abc", "--digest-file", str(digest_file)]
    assert main(argv) == 0
    pushed = [args for args in docker.commands() if args[0] == "push"]
    assert pushed == [["push", f"{url}:git-abc-baked-test--tiny-sd-r1"]]
    assert baked.baked_model(FakeDocker(), "sd:test") is None  # a model-less image keeps its tag
