"""The image variants from the operator's side: `make build-image ENGINE=openvino` builds the OpenVINO
image under its own tag, `make push-image ENGINE=openvino` pushes that one under its own remote tag, and an
unknown ENGINE stops in one line (fake docker, moto's ECR; no Docker engine needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from infra.test_make_targets import dry_run, flag_value
from ops.test_push import ACCOUNT, REGION, FakeDocker, aws  # noqa: F401  (aws: the moto ECR fixture)

from sd_lambda.cli import MAKE_VARIABLES, main
from sd_lambda.layout import ENGINES
from sd_lambda.ops.container import cli as container_cli
from sd_lambda.ops.container.docker import (
    DEFAULT_ENGINE,
    build_command,
    engine_image,
    engine_suffix,
    engine_tag,
)

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY_URL = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sd-lambda"


@pytest.mark.parametrize(
    ("image", "engine", "variant"),
    [
        ("sd-lambda:local", "torch", "sd-lambda:local"),
        ("sd-lambda:local", "openvino", "sd-lambda:local-openvino"),
        ("sd-lambda", "openvino", "sd-lambda:latest-openvino"),
        # A registry host's port is not a tag.
        ("localhost:5000/team/sd", "openvino", "localhost:5000/team/sd:latest-openvino"),
        ("localhost:5000/team/sd:v1", "openvino", "localhost:5000/team/sd:v1-openvino"),
        # The suffix is added once, and a digest reference is already one image.
        ("sd-lambda:v1-openvino", "openvino", "sd-lambda:v1-openvino"),
        ("sd@sha256:" + "a" * 64, "openvino", "sd@sha256:" + "a" * 64),
    ],
)
def test_each_engine_has_its_own_local_image(image: str, engine: str, variant: str) -> None:
    assert engine_image(image, engine) == variant


def test_only_the_default_engine_keeps_the_plain_tags() -> None:
    assert DEFAULT_ENGINE == "torch"
    suffixes = {engine: engine_suffix(engine) for engine in ENGINES}
    assert suffixes == {"torch": "", "openvino": "-openvino"}


@pytest.mark.parametrize("engine", ENGINES)
def test_build_image_passes_the_engine_build_arg_and_tags_the_variant(
    engine: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    docker = FakeDocker()
    monkeypatch.setattr(container_cli, "docker_cli", lambda binary: docker)
    monkeypatch.chdir(ROOT)
    argv = ["build-image", "--tag", "sd:test", "--engine", engine, "--build-arg", "BASE_DIGEST=sha256:ab"]
    assert main(argv) == 0
    tag = engine_image("sd:test", engine)
    built = docker.commands()[-1]
    # The default engine is the Dockerfile's default too: only another engine needs the build arg.
    engine_arg = {} if engine == DEFAULT_ENGINE else {"ENGINE": engine}
    assert built == build_command(tag, build_args={"BASE_DIGEST": "sha256:ab", **engine_arg})
    assert f"built {tag} for linux/amd64 ({engine} engine)" in capsys.readouterr().out


def test_the_engine_is_not_a_build_arg(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(container_cli, "docker_cli", lambda binary: FakeDocker())
    monkeypatch.chdir(ROOT)
    assert main(["build-image", "--build-arg", "ENGINE=openvino"]) == 1
    assert capsys.readouterr().err == (
        "sd-lambda build-image: error: choose the engine with --engine, not a build arg\n"
    )


@pytest.mark.parametrize("command", ["build-image", "push-image"])
def test_an_unknown_engine_is_one_line(command: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    docker = FakeDocker()
    monkeypatch.setattr(container_cli, "docker_cli", lambda binary: docker)
    monkeypatch.chdir(ROOT)
    where = ["--repository-url", REPOSITORY_URL] if command == "push-image" else []
    assert main([command, "--engine", "onnx", *where]) == 1
    assert capsys.readouterr().err == (
        f"sd-lambda {command}: error: --engine onnx is not an engine: use torch or openvino\n"
    )
    assert docker.commands() == []  # refused before docker runs


def test_push_image_pushes_the_variant_under_its_own_remote_tag(
    aws,  # noqa: F811  (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    docker = FakeDocker(aws)
    monkeypatch.setattr(container_cli, "docker_cli", lambda binary: docker)
    references = {}
    for engine in ENGINES:
        digest_file = tmp_path / f"{engine}.digest"
        argv = ["push-image", "--repository-url", REPOSITORY_URL, "--tag", "git-feed", "--engine", engine]
        assert main([*argv, "--digest-file", str(digest_file)]) == 0
        references[engine] = digest_file.read_text().strip()
    pushed = [args for args in docker.commands() if args[0] in ("tag", "push")]
    assert pushed == [
        ["tag", "sd-lambda:local", f"{REPOSITORY_URL}:git-feed"],
        ["push", f"{REPOSITORY_URL}:git-feed"],
        ["tag", "sd-lambda:local-openvino", f"{REPOSITORY_URL}:git-feed-openvino"],
        ["push", f"{REPOSITORY_URL}:git-feed-openvino"],
    ]
    # Both are in the (immutable) repository: the OpenVINO push did not reuse the torch image's tag.
    tags = {
        tag
        for image in aws.list_images(repositoryName="sd-lambda")["imageIds"]
        for tag in [image["imageTag"]]
    }
    assert tags == {"git-feed", "git-feed-openvino"}
    assert all(reference.startswith(f"{REPOSITORY_URL}@sha256:") for reference in references.values())


def test_make_passes_engine_to_build_and_push() -> None:
    assert MAKE_VARIABLES["--engine"] == "ENGINE"
    for target in ("build-image", "push-image"):
        assert flag_value(dry_run(target), "--engine") == DEFAULT_ENGINE
        assert flag_value(dry_run(target, "ENGINE=openvino"), "--engine") == "openvino"


def test_make_build_image_with_an_unknown_engine_names_the_variable() -> None:
    completed = subprocess.run(
        ["make", "-s", "--no-print-directory", "-o", ".venv/.stamp-ops", "build-image", "ENGINE=onnx"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "MAKEFLAGS": ""},
        check=False,
        timeout=120,
    )
    assert completed.returncode != 0
    ours = [line for line in completed.stderr.splitlines() if line.startswith("sd-lambda")]
    assert ours == ["sd-lambda build-image: error: ENGINE=onnx is not an engine: use torch or openvino"]


def test_a_pushed_tag_gets_the_engines_suffix_once() -> None:
    assert engine_tag("git-abc1234", "openvino") == "git-abc1234-openvino"
    assert engine_tag("v1-openvino", "openvino") == "v1-openvino"
    assert engine_tag("v1", "torch") == "v1"
