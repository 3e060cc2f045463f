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
import subprocess
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from sd_lambda.cli import main
from sd_lambda.layout import ModelPaths, verify_release
from sd_lambda.seeding import flow
from sd_lambda.seeding.efs_sync import FIRST_BOOT_STOP, PROGRESS_DIR, SEED_MARKER
from sd_lambda.seeding.payload import program_bytes, program_key, program_sha256
from sd_lambda.seeding.upload import SHA256_METADATA

from .conftest import REGION, SeederProgram, make_model

NAME = "acme--tiny-sd"
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
