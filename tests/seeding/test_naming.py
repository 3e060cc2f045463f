"""The seeded model is the one the function serves (#21 item 7): decided from the stack's ``model_name``
before anything is downloaded, and a mismatch is one line naming both and how to change either."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from sd_lambda.cli import main
from sd_lambda.seeding import flow
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.target import Target, seed_name

from .conftest import REGION, make_model
from .test_sources import COMMIT, FakeHub, install_fake_hub

SERVED = "segmind--tiny-sd"
STACK = Target(bucket="stack-weights", instance_id="i-0stack", region=REGION, model_name=SERVED)
FLAGS_ONLY = Target(bucket="b", instance_id="i-1", region=REGION)
MISMATCH = (
    f"--name acme--other is not the model the function serves ({SERVED}): drop --name to seed "
    f'{SERVED}, or set model_name = "acme--other" in terraform.tfvars and make apply, or pass '
    "--not-served to seed it for later"
)


def test_without_a_name_the_served_model_is_seeded() -> None:
    # The hub id names the weights, not the folder: the function reads only model_name's folder.
    assert seed_name(STACK, None, "runwayml/stable-diffusion-v1-5", not_served=False) == SERVED
    assert seed_name(STACK, None, None, not_served=False) == SERVED
    assert seed_name(STACK, "segmind/tiny-sd", "acme/x", not_served=False) == SERVED  # the same, as a hub id


def test_another_name_is_refused_unless_deliberate() -> None:
    with pytest.raises(SeedError) as caught:
        seed_name(STACK, "acme/other", "acme/other", not_served=False)
    assert str(caught.value) == MISMATCH
    assert seed_name(STACK, "acme/other", "acme/other", not_served=True) == "acme--other"


def test_without_stack_outputs_the_name_is_taken_as_given() -> None:
    assert seed_name(FLAGS_ONLY, "mine", "acme/x", not_served=False) == "mine"
    assert seed_name(FLAGS_ONLY, None, "acme/x", not_served=False) == "acme--x"
    with pytest.raises(SeedError, match="no model name: pass --name"):
        seed_name(FLAGS_ONLY, None, None, not_served=False)


# --- through the command ---------------------------------------------------------------------------

OUTPUTS = {
    "weights_bucket_name": "stack-weights",
    "weights_prefix": "models/",
    "seeder_instance_id": "i-0stack",
    "region": REGION,
    "model_name": SERVED,
    "function_name": "sd",
}


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> None:
    import sd_lambda.ops.stack_outputs

    monkeypatch.setattr(sd_lambda.ops.stack_outputs, "read_outputs", lambda infra_dir: OUTPUTS)


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    def create(region: str | None) -> flow.AwsClients:
        raise AssertionError("AWS was asked before the name was settled")

    monkeypatch.setattr(flow.AwsClients, "create", create)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path) -> FakeHub:
    return install_fake_hub(monkeypatch, tiny_model_dir, tmp_path)


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.usefixtures("stack", "no_aws")
def test_a_mismatch_is_one_line_before_the_hub_or_aws(
    hub: FakeHub, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["seed", "--model", "acme/tiny-sd", "--name", "acme/other", "--work-dir", str(tmp_path / "w")]
    assert _one_line(capsys, argv) == f"sd-lambda seed: error: {MISMATCH}"
    assert hub.downloads == []
    warm = ["seed", "--model", "acme/tiny-sd", "--name", "acme/other", "--not-served", "--warm"]
    assert _one_line(capsys, warm) == (
        f"sd-lambda seed: error: --warm loads the served model ({SERVED}), not acme--other: drop --warm"
    )


@pytest.fixture
def aws(aws_env: dict[str, str]) -> Iterator[Any]:
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="stack-weights")
        yield s3


def _uploaded(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[dict[str, Any], str]:
    assert main([*argv, "--upload-only", "--no-progress", "--json"]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    return json.loads(out), err


@pytest.mark.usefixtures("stack")
def test_a_hub_model_is_seeded_under_the_served_name(
    aws: Any, hub: FakeHub, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    printed, err = _uploaded(capsys, ["seed", "--model", "acme/tiny-sd", "--work-dir", str(tmp_path / "w")])
    assert printed["uploaded"] == f"s3://stack-weights/models/{SERVED}/{COMMIT[:12]}/"
    assert f"seeding acme/tiny-sd as {SERVED}, the model the function serves (model_name)" in err
    listed = aws.list_objects_v2(Bucket="stack-weights", Prefix="models/")["Contents"]
    assert {obj["Key"].split("/")[1] for obj in listed} == {SERVED}


@pytest.mark.usefixtures("stack")
def test_a_second_model_is_seeded_when_deliberate(
    aws: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = make_model(tmp_path / "m", "v1")
    argv = ["seed", "--from-dir", str(folder), "--name", "acme/other", "--not-served", "--revision", "r1"]
    printed, _ = _uploaded(capsys, argv)
    assert printed["uploaded"] == "s3://stack-weights/models/acme--other/r1/"


@pytest.mark.usefixtures("stack", "no_aws")
def test_a_rollback_of_a_model_not_served_is_refused_like_a_seed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make rollback`` passes NAME (or MODEL): a folder the function does not read is refused before AWS,
    as seed refuses it, unless --not-served (#21 item 7)."""
    refused = (
        f"sd-lambda rollback: error: --name acme--other is not the model the function serves ({SERVED}): "
        f"drop --name to roll back {SERVED}, or pass --not-served to roll back "
        "acme--other anyway"
    )
    assert _one_line(capsys, ["rollback", "--name", "acme/other", "--revision", "r1"]) == refused
    assert flow.rollback_name(None, STACK) == flow.rollback_name("segmind/tiny-sd", STACK) == SERVED
    assert flow.rollback_name("mine", FLAGS_ONLY) == "mine"  # no served model to compare with
    with pytest.raises(SeedError, match="no model name: pass --name"):
        flow.rollback_name(None, FLAGS_ONLY)
    rolled: list[tuple[str, str]] = []
    monkeypatch.setattr(flow.AwsClients, "create", lambda region: None)
    monkeypatch.setattr(
        flow, "rollback", lambda c, t, name, revision, o, adapter=None: rolled.append((name, revision)) or {}
    )
    assert main(["rollback", "--name", "acme/other", "--not-served", "--revision", "r1"]) == 0
    assert rolled == [("acme--other", "r1")]


def test_the_make_target_passes_name() -> None:
    from .test_cli import _make

    dry = _make("-n", "seed-models", "MODEL=acme/tiny-sd", "NAME=segmind/tiny-sd")
    assert "--model 'acme/tiny-sd'" in dry.stdout
    assert "--name 'segmind/tiny-sd'" in dry.stdout
    assert "--name" not in _make("-n", "seed-models", "MODEL=acme/tiny-sd").stdout  # the served model
    dry = _make("-n", "rollback", "NAME=acme/other", "REVISION=r1")
    # make rollback runs deploy rollback, which hands an EFS stack's arguments after -- to sd-lambda rollback.
    command = " ".join(dry.stdout.replace("\\\n", " ").split())
    assert "sd-lambda deploy rollback" in command
    assert "-- --name 'acme/other'" in command
    assert "--revision 'r1'" in dry.stdout
    assert "--not-served" not in dry.stdout
    dry = _make("-n", "rollback", "NAME=acme/other", "REVISION=r1", "NOT_SERVED=1")
    assert "-- --name 'acme/other' --not-served" in " ".join(dry.stdout.replace("\\\n", " ").split())
