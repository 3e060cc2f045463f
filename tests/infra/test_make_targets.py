"""`make plan/apply/destroy` hand the right arguments to `sd-lambda deploy` (dry runs: `make -n`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def dry_run(target: str, *assignments: str) -> str:
    make = shutil.which("make")
    assert make, "make is required"
    result = subprocess.run(
        [make, "-n", "--no-print-directory", target, *assignments],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in result.stdout.replace("\\\n", " ").splitlines() if "sd-lambda deploy" in line]
    assert len(lines) == 1, result.stdout
    return " ".join(lines[0].split())


def test_apply_builds_and_pushes_unless_an_image_is_given() -> None:
    staged = dry_run("apply", "REGION=eu-west-1", "TFVARS=prod.tfvars")
    assert 'deploy apply --infra-dir "infra" --region "eu-west-1" --var-file prod.tfvars' in staged
    assert '--push-command "make --no-print-directory build-image push-image"' in staged

    pinned = dry_run("apply", "IMAGE_URI=123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd@sha256:abc")
    assert '--image-uri "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd@sha256:abc"' in pinned
    assert "--push-command" not in pinned


def test_plan_passes_the_backend_config() -> None:
    assert '--backend-config "backend.hcl"' in dry_run("plan", "BACKEND_CONFIG=backend.hcl")


@pytest.mark.parametrize(
    ("confirm", "expect_yes"), [(None, False), ("CONFIRM=1", True), ("CONFIRM=0", False)]
)
def test_destroy_confirms_unless_confirm_is_1(confirm: str | None, expect_yes: bool) -> None:
    line = dry_run("destroy", *([confirm] if confirm else []))
    assert line.startswith(".venv/bin/sd-lambda deploy destroy")
    assert line.endswith("--yes") is expect_yes


@pytest.mark.parametrize("target", ["plan", "apply"])
def test_allow_function_delete_is_passed_only_when_1(target: str) -> None:
    assert dry_run(target, "ALLOW_FUNCTION_DELETE=1").endswith("--allow-function-delete")
    assert "--allow-function-delete" not in dry_run(target)
    assert "--allow-function-delete" not in dry_run(target, "ALLOW_FUNCTION_DELETE=0")


@pytest.mark.parametrize("target", ["plan", "apply"])
def test_allow_data_loss_is_passed_only_when_1(target: str) -> None:
    assert dry_run(target, "ALLOW_DATA_LOSS=1").endswith("--allow-data-loss")
    assert "--allow-data-loss" not in dry_run(target)
    assert "--allow-data-loss" not in dry_run(target, "ALLOW_DATA_LOSS=0")


def test_preflight_is_its_own_target_and_needs_docker_only_without_an_image() -> None:
    checked = dry_run("preflight", "REGION=eu-west-1", "TFVARS=prod.tfvars", "DOCKER=podman")
    assert checked.startswith('.venv/bin/sd-lambda deploy preflight --infra-dir "infra" --region "eu-west-1"')
    assert "--var-file prod.tfvars" in checked
    assert checked.endswith('--docker "podman"')

    pinned = dry_run("preflight", "IMAGE_URI=123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd@sha256:abc")
    assert pinned.endswith('--image-uri "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd@sha256:abc"')
    assert "--docker" not in pinned


def test_apply_hands_the_docker_cli_to_its_preflight() -> None:
    assert '--docker "podman"' in dry_run("apply", "DOCKER=podman")
    assert "--docker" not in dry_run("apply", "IMAGE_URI=x@sha256:abc")
