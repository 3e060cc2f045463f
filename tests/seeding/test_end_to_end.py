"""``sd-lambda seed`` / ``rollback`` end to end against a local AWS (moto's server: S3, EC2, IAM, SSM).

moto's SSM records commands but runs nothing, so a stand-in agent runs each recorded command with
``/bin/sh`` on this machine (``python3`` = the seeder's Python 3.9, ``aws`` = the dev extra's AWS CLI),
against the same local S3, with a temp folder as the EFS mount: the command fetches the program the
driver put in the bucket, checks its sha256 and runs it. botocore's Stubber answers the agent-online
question.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest

from sd_lambda.cli import main
from sd_lambda.layout import ModelPaths, verify_release
from sd_lambda.seeding.payload import program_bytes, program_key, program_sha256
from sd_lambda.seeding.upload import SHA256_METADATA

from .conftest import REGION, LocalAgent, SeederProgram, make_model

NAME = "acme--tiny-sd"


def _state(instance_id: str) -> str:
    ec2 = boto3.client("ec2", region_name=REGION)
    return str(
        ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]
    )


def test_seed_and_rollback(
    local_aws: tuple[LocalAgent, list[str]],
    seeder: SeederProgram,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent, stack = local_aws
    paths = ModelPaths(seeder.mount / NAME)

    # 1. a real pipeline from a folder: upload, start the seeder, sync, switch, stop the seeder.
    seed = ["seed", "--from-dir", str(tiny_model_dir), "--name", NAME, "--revision", "r1", "--no-progress"]
    assert main([*seed, *stack, "--json"]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    seeded = json.loads(out)
    assert (seeded["model"], seeded["revision"], seeded["current"]) == (NAME, "r1", "r1")
    assert seeded["downloaded_bytes"] == seeded["total_bytes"] > 0
    program = f"s3://{seeder.bucket}/{program_key('models/')}"
    assert f"sync program {program} (uploaded)" in err
    assert f"aws s3 cp {program} " in agent.scripts[0][4]
    assert os.readlink(paths.current) == "releases/r1"
    manifest = verify_release(paths.resolve_current())
    assert {e.path for e in manifest.files} >= {
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
    }
    release_files = [p for p in paths.release("r1").rglob("*")]
    assert {(p.stat().st_uid, p.stat().st_gid) for p in release_files} == {(1000, 1000)}
    assert _state(agent.instance_id) in {"stopping", "stopped"}
    # The sync kept its progress file (in the stand-in /run) up to date, to the end.
    (progress_file,) = agent.run_dir.glob("*.json")
    assert json.loads(progress_file.read_text()) == {
        "phase": "done",
        "bytes_done": seeded["total_bytes"],
        "bytes_total": seeded["total_bytes"],
        "files_done": len(manifest.files),
        "files_total": len(manifest.files),
    }

    # 2. upload only, then seed what is in S3.
    v2 = make_model(tmp_path / "v2", "v2")
    upload = [
        "seed",
        "--from-dir",
        str(v2),
        "--name",
        NAME,
        "--revision",
        "r2",
        "--upload-only",
        "--no-progress",
    ]
    assert main([*upload, *stack]) == 0
    assert len(agent.scripts) == 1  # nothing ran on the seeder
    url = f"s3://{seeder.bucket}/models/{NAME}/r2/"
    assert main(["seed", "--from-s3", url, *stack]) == 0, capsys.readouterr().err
    assert paths.current_revision() == "r2"

    # 3. rollback (the program is in the bucket already: not uploaded again).
    assert main(["rollback", "--name", NAME, "--revision", "r1", *stack]) == 0
    assert paths.current_revision() == "r1"
    assert f"sync program {program} (already there)" in capsys.readouterr().err

    # 4. a corrupted object: one-line error, non-zero, current untouched.
    v3 = make_model(tmp_path / "v3", "v3")
    assert (
        main(["seed", "--from-dir", str(v3), "--name", NAME, "--revision", "r3", "--upload-only", *stack])
        == 0
    )
    boto3.client("s3", region_name=REGION).put_object(
        Bucket=seeder.bucket, Key=f"models/{NAME}/r3/unet/part0.safetensors", Body=b"corrupt"
    )
    assert main(["seed", "--from-s3", f"s3://{seeder.bucket}/models/{NAME}/r3/", *stack]) == 1
    err = capsys.readouterr().err
    assert "sd-lambda seed: error: the seeder's run Failed (exit 1): manifest mismatch" in err
    assert "unet/part0.safetensors" in err
    assert paths.current_revision() == "r1"
    assert _state(agent.instance_id) in {"stopping", "stopped"}  # stopped on failure too


def test_a_replaced_program_never_runs(
    local_aws: tuple[LocalAgent, list[str]], seeder: SeederProgram, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone swapped the program in S3 for other bytes (same size, forged sha256 metadata, so the driver
    does not upload it again): the command's sha256 check refuses it before python3 runs anything."""
    agent, stack = local_aws
    marker = seeder.mount / "forged-program-ran"
    forged = f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n#".encode()
    forged = forged.ljust(len(program_bytes()), b"x")
    key = program_key("models/")
    boto3.client("s3", region_name=REGION).put_object(
        Bucket=seeder.bucket, Key=key, Body=forged, Metadata={SHA256_METADATA: program_sha256()}
    )
    assert main(["rollback", "--name", NAME, "--revision", "r1", *stack]) == 1
    err = capsys.readouterr().err
    assert f"sync program s3://{seeder.bucket}/{key} (already there)" in err
    assert (
        f"error: the seeder's run Failed (exit 1): s3://{seeder.bucket}/{key} is not the program this driver "
        "shipped (sha256 mismatch); nothing ran"
    ) in err
    assert len(agent.scripts) == 1
    assert not marker.exists()
    assert _state(agent.instance_id) in {"stopping", "stopped"}
