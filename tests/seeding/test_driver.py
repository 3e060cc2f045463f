"""The operator's side with moto (S3, EC2, IAM, SSM) and botocore's Stubber where moto has no answer."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber
from helpers import FakeClock
from moto import mock_aws

from sd_lambda.layout import MANIFEST, LayoutError, Manifest, check_name
from sd_lambda.seeding import flow
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.payload import (
    PROGRAM_FOLDER,
    ShippedProgram,
    program_bytes,
    program_key,
    program_sha256,
    ship_program,
)
from sd_lambda.seeding.remote import DOCUMENT, mount_check_script, run_command, shell_script
from sd_lambda.seeding.seeder import Seeder
from sd_lambda.seeding.sources import from_dir
from sd_lambda.seeding.target import Target
from sd_lambda.seeding.upload import SHA256_METADATA, check_bucket

from .conftest import REGION, make_model

NAME = "acme--tiny-sd"
AMI_ID = "ami-12c6146b"  # one of the images moto knows
COMMAND_ID = "0b5f3c1e-1111-4222-8333-944455556666"


@pytest.fixture
def aws(aws_env: dict[str, str]) -> Iterator[flow.AwsClients]:
    with mock_aws():
        yield flow.AwsClients.create(REGION)


def _instance(clients: flow.AwsClients, state: str = "stopped") -> str:
    """A seeder like the stack's: an instance with an instance profile, IMDSv2 required."""
    iam = boto3.client("iam", region_name=REGION)
    iam.create_role(RoleName="seeder", AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName="seeder")
    iam.add_role_to_instance_profile(InstanceProfileName="seeder", RoleName="seeder")
    instance_id = clients.ec2.run_instances(
        ImageId=AMI_ID,
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.small",
        IamInstanceProfile={"Name": "seeder"},
        MetadataOptions={"HttpTokens": "required"},
    )["Instances"][0]["InstanceId"]
    if state == "stopped":
        clients.ec2.stop_instances(InstanceIds=[instance_id])
    return str(instance_id)


def _state(clients: flow.AwsClients, instance_id: str) -> str:
    reservations = clients.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


def _stage(clients: flow.AwsClients, target: Target, tmp_path: Path) -> flow.S3Release:
    release = from_dir(make_model(tmp_path / "m", "v1"))
    return flow.stage_local(clients, target, release, NAME, "r1", progress=False)


def _target(clients: flow.AwsClients, instance_id: str = "i-0123456789abcdef0") -> Target:
    clients.s3.create_bucket(Bucket="weights")
    return Target(bucket="weights", instance_id=instance_id, region=REGION)


# --- upload ----------------------------------------------------------------------------------------


def test_upload_writes_objects_then_manifest(aws: flow.AwsClients, tmp_path: Path) -> None:
    target = _target(aws)
    release = from_dir(make_model(tmp_path / "m", "v1"))
    staged = flow.stage_local(aws, target, release, NAME, "r1", progress=False)
    assert staged.key_prefix == f"models/{NAME}/r1/"
    assert staged.uploaded == {"uploaded_files": 4, "skipped_files": 0}
    raw = aws.s3.get_object(Bucket="weights", Key=staged.key_prefix + MANIFEST)["Body"].read()
    assert hashlib.sha256(raw).hexdigest() == staged.manifest_sha256
    manifest = Manifest.from_json(raw.decode())
    assert manifest.files == release.manifest.files
    assert manifest.source.startswith("dir:")
    for entry in manifest.files:
        head = aws.s3.head_object(Bucket="weights", Key=staged.key_prefix + entry.path)
        assert head["Metadata"][SHA256_METADATA] == entry.sha256
        assert head["ContentLength"] == entry.size
        body = aws.s3.get_object(Bucket="weights", Key=staged.key_prefix + entry.path)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry.sha256


def test_upload_skips_unchanged_and_keeps_the_manifest(aws: flow.AwsClients, tmp_path: Path) -> None:
    target = _target(aws)
    folder = make_model(tmp_path / "m", "v1")
    first = flow.stage_local(aws, target, from_dir(folder), NAME, "r1", progress=False)
    again = flow.stage_local(aws, target, from_dir(folder), NAME, "r1", progress=False)
    assert again.uploaded == {"uploaded_files": 0, "skipped_files": 4}
    # The manifest's bytes (and so the sha256 the seeder pins) survive a re-run.
    assert again.manifest_sha256 == first.manifest_sha256

    # An object lost (or replaced) in S3 is uploaded again, and only that one.
    aws.s3.put_object(Bucket="weights", Key=first.key_prefix + "unet/part1.safetensors", Body=b"x")
    repaired = flow.stage_local(aws, target, from_dir(folder), NAME, "r1", progress=False)
    assert repaired.uploaded == {"uploaded_files": 1, "skipped_files": 3}


def test_upload_never_overwrites_other_content(aws: flow.AwsClients, tmp_path: Path) -> None:
    target = _target(aws)
    flow.stage_local(aws, target, from_dir(make_model(tmp_path / "a", "v1")), NAME, "r1", progress=False)
    with pytest.raises(SeedError, match="already holds a different revision"):
        flow.stage_local(aws, target, from_dir(make_model(tmp_path / "b", "v2")), NAME, "r1", progress=False)


def test_missing_bucket(aws: flow.AwsClients) -> None:
    with pytest.raises(SeedError, match="bucket nope does not exist"):
        check_bucket(aws.s3, "nope")


def test_access_denied_names_the_permission(aws_env: dict[str, str]) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    with Stubber(s3) as stub:
        stub.add_client_error("head_bucket", service_error_code="403", http_status_code=403)
        with pytest.raises(SeedError, match=r"AccessDenied: you need s3:ListBucket on arn:aws:s3:::weights"):
            check_bucket(s3, "weights")
    ssm = boto3.client("ssm", region_name=REGION)
    with Stubber(ssm) as stub:
        stub.add_client_error(
            "send_command",
            service_error_code="AccessDeniedException",
            service_message="User: arn:aws:iam::1:user/op is not authorized to perform: ssm:SendCommand",
        )
        with pytest.raises(SeedError, match=r"AccessDenied: you need ssm:SendCommand on i-1"):
            run_command(ssm, "i-1", ["true"], execution_timeout=60, comment="c")
    ec2 = boto3.client("ec2", region_name=REGION)
    with Stubber(ec2) as stub:
        stub.add_client_error("describe_instances", service_error_code="UnauthorizedOperation")
        with pytest.raises(SeedError, match=r"AccessDenied: you need ec2:DescribeInstances on i-1"):
            Seeder(ec2, ssm, "i-1").start_if_stopped()


def test_from_s3_reads_the_uploaded_manifest(aws: flow.AwsClients, tmp_path: Path) -> None:
    target = _target(aws)
    staged = flow.stage_local(
        aws, target, from_dir(make_model(tmp_path / "m", "v1")), NAME, "r1", progress=False
    )
    again = flow.stage_s3(aws, f"s3://weights/models/{NAME}/r1/")
    assert (again.name, again.revision, again.manifest_sha256) == (NAME, "r1", staged.manifest_sha256)
    with pytest.raises(SeedError, match=r"manifest\.json does not exist"):
        flow.stage_s3(aws, f"s3://weights/models/{NAME}/r2/")


# --- the seeder --------------------------------------------------------------------------------------


def _online_stub(client: Any, statuses: list[str | None], instance_id: str) -> Stubber:
    stub = Stubber(client)
    for status in statuses:
        found = [] if status is None else [{"InstanceId": instance_id, "PingStatus": status}]
        stub.add_response(
            "describe_instance_information",
            {"InstanceInformationList": found},
            {"Filters": [{"Key": "InstanceIds", "Values": [instance_id]}]},
        )
    return stub


def _ready_stub(client: Any, instance_id: str) -> Stubber:
    """What the agent answers while a session opens (Online, the mount check succeeds): asked once per
    run, the seeder still running when the run's command is sent (#21 item 7)."""
    stub = _online_stub(client, ["Online"], instance_id)
    stub.add_response(
        "get_command_invocation", {"Status": "Success", "ResponseCode": 0, "StandardOutputContent": "mounted"}
    )
    return stub


def test_start_wait_online(aws: flow.AwsClients) -> None:
    instance_id = _instance(aws, "stopped")
    ssm = boto3.client("ssm", region_name=REGION)
    clock = FakeClock()
    seeder = Seeder(aws.ec2, ssm, instance_id, sleep=clock.sleep, clock=clock, log=lambda _: None)
    seeder.start_if_stopped()
    assert _state(aws, instance_id) == "running"
    seeder.start_if_stopped()  # already running: nothing asked of EC2
    with _online_stub(ssm, [None, "ConnectionLost", "Online"], instance_id) as stub:
        seeder.wait_ready(online_timeout=60)
        stub.assert_no_pending_responses()
    assert clock.sleeps == [5.0, 5.0]
    seeder.stop()
    assert _state(aws, instance_id) in {"stopping", "stopped"}


def test_agent_never_online(aws: flow.AwsClients) -> None:
    ssm = boto3.client("ssm", region_name=REGION)
    clock = FakeClock()
    seeder = Seeder(aws.ec2, ssm, "i-1", poll_interval=10, sleep=clock.sleep, clock=clock)
    with _online_stub(ssm, [None] + ["ConnectionLost"] * 3, "i-1"), pytest.raises(SeedError) as caught:
        seeder.wait_online(timeout=30)
    assert "not Online after 30s (status: ConnectionLost)" in str(caught.value)
    # The role carries the agent's actions inline, not the managed policy (#21 item 21).
    assert str(caught.value).endswith("(ssm:UpdateInstanceInformation, ec2messages:*, ssmmessages:*)")
    assert "AmazonSSMManagedInstanceCore" not in str(caught.value)
    assert clock.now == 30


def test_instance_not_found(aws: flow.AwsClients) -> None:
    seeder = Seeder(aws.ec2, aws.ssm, "i-0123456789abcdef0")
    with pytest.raises(SeedError, match="seeder instance i-0123456789abcdef0 not found"):
        seeder.start_if_stopped()


def test_terminated_instance(aws: flow.AwsClients) -> None:
    instance_id = _instance(aws, "running")
    aws.ec2.terminate_instances(InstanceIds=[instance_id])
    with pytest.raises(SeedError, match="is terminated: re-apply the stack"):
        Seeder(aws.ec2, aws.ssm, instance_id).start_if_stopped()


# --- the command ---------------------------------------------------------------------------------------


class SsmWithStubbedAgent:
    """moto's SSM for everything it does; a Stubber'd client for what only a real agent can answer."""

    def __init__(self, moto_ssm: Any, stubbed: Any) -> None:
        self.moto_ssm = moto_ssm
        self.stubbed = stubbed

    def __getattr__(self, name: str) -> Any:
        if name in {"describe_instance_information", "get_command_invocation"}:
            return getattr(self.stubbed, name)
        return getattr(self.moto_ssm, name)


def _expected_argv(staged: flow.S3Release, progress_file: str) -> list[str]:
    return [
        "sync", "--mount", "/mnt/models", "--require-mount", "--mount-wait", "300",
        "--name", NAME, "--revision", "r1",
        "--bucket", "weights", "--s3-prefix", f"models/{NAME}/r1/",
        "--manifest-sha256", staged.manifest_sha256,
        "--keep", "3", "--owner", "1000:1000", "--lock-timeout", "0", "--region", REGION,
        "--progress-file", progress_file,
    ]  # fmt: skip


def test_seed_sends_the_exact_command_and_stops_the_seeder(aws: flow.AwsClients, tmp_path: Path) -> None:
    instance_id = _instance(aws, "stopped")
    target = _target(aws, instance_id)
    staged = flow.stage_local(
        aws, target, from_dir(make_model(tmp_path / "m", "v1")), NAME, "r1", progress=False
    )
    stubbed = boto3.client("ssm", region_name=REGION)
    result = {"model": NAME, "revision": "r1", "previous": None}
    with _ready_stub(stubbed, instance_id) as stub:
        stub.add_response("get_command_invocation", {"Status": "InProgress"})
        stub.add_response(
            "get_command_invocation",
            {"Status": "Success", "ResponseCode": 0, "StandardOutputContent": "RESULT " + json.dumps(result)},
        )
        clients = flow.AwsClients(aws.s3, aws.ec2, SsmWithStubbedAgent(aws.ssm, stubbed))
        clock = FakeClock()
        options = flow.RunOptions(sleep=clock.sleep, clock=clock)
        assert flow.sync_on_seeder(clients, target, staged, options) == result
        stub.assert_no_pending_responses()
    assert _state(aws, instance_id) in {"stopping", "stopped"}

    mount_check, command = aws.ssm.list_commands()["Commands"]
    assert mount_check["Comment"] == "sd-lambda mount check /mnt/models"
    assert mount_check["Parameters"]["commands"] == mount_check_script("/mnt/models", 300)
    assert mount_check["Parameters"]["executionTimeout"] == [str(flow.MOUNT_CHECK_TIMEOUT_S)]
    assert command["DocumentName"] == DOCUMENT == "AWS-RunShellScript"
    assert command["InstanceIds"] == [instance_id]
    assert command["Parameters"]["executionTimeout"] == ["3600"]
    assert command["Comment"] == f"sd-lambda seed {NAME}@r1"
    lines = command["Parameters"]["commands"]
    key = f"models/.sd-lambda/efs-sync-{program_sha256()[:16]}.pyz"
    program = ShippedProgram("weights", key, program_sha256(), uploaded=True)
    # One progress file per run, in the seeder's /run folder for them.
    progress_file = shlex.split(lines[-1])[-1]
    assert re.fullmatch(r"/run/sd-lambda-sync/[0-9a-f]{32}\.json", progress_file), progress_file
    assert lines == shell_script(program, _expected_argv(staged, progress_file), REGION)
    # The program is in the bucket, byte for byte, under the prefix the seeder's role may read ...
    shipped = aws.s3.get_object(Bucket="weights", Key=key)
    assert shipped["Body"].read() == program_bytes()
    assert shipped["Metadata"][SHA256_METADATA] == program_sha256()
    # ... and the command fetches it with the AWS CLI, checks the full sha256 and runs it.
    assert lines == [
        "set -eu",
        'work="$(mktemp -d /tmp/sd-lambda-efs-sync.XXXXXXXX)"',
        "trap 'rm -rf \"$work\"' EXIT",
        'program="$work/efs-sync.pyz"',
        f'aws s3 cp s3://weights/{key} "$program" --only-show-errors --region {REGION} || '
        f"{{ echo 'error: cannot fetch the sync program s3://weights/{key} (the seeder role needs "
        "s3:GetObject on it)' >&2; exit 1; }",
        f"echo '{program_sha256()}  '\"$program\" | sha256sum -c --quiet - || "
        f"{{ echo 'error: s3://weights/{key} is not the program this driver shipped (sha256 mismatch); "
        "nothing ran' >&2; exit 1; }",
        'python3 "$program" ' + shlex.join(_expected_argv(staged, progress_file)),
    ]
    assert len("\n".join(lines).encode()) < 2048


def test_program_is_shipped_once_per_version(aws: flow.AwsClients) -> None:
    _target(aws)  # creates the bucket
    first = ship_program(aws.s3, "weights", "models/")
    assert (first.key, first.uploaded) == (program_key("models/"), True)
    assert first.url == f"s3://weights/models/.sd-lambda/efs-sync-{program_sha256()[:16]}.pyz"
    assert ship_program(aws.s3, "weights", "models/").uploaded is False  # same bytes: skipped
    aws.s3.put_object(Bucket="weights", Key=first.key, Body=b"not the program")
    assert ship_program(aws.s3, "weights", "models/").uploaded is True  # damaged: replaced
    assert aws.s3.get_object(Bucket="weights", Key=first.key)["Body"].read() == program_bytes()
    # Under the weights prefix (a bucket-root prefix too), in a folder no model name can take.
    assert Target("b", "i", prefix="weights").key_prefix == "weights/"
    assert program_key(Target("b", "i", prefix="").key_prefix).startswith(".sd-lambda/efs-sync-")
    with pytest.raises(LayoutError, match="invalid model name"):
        check_name(PROGRAM_FOLDER, "model name")


def test_seeder_role_may_read_the_program() -> None:
    """The seeder module grants s3:GetObject on ``<bucket>/<weights_prefix>*``: the program key is inside."""
    import hcl2
    from hcl2.utils import SerializationOptions

    module = Path(__file__).parents[2] / "infra" / "modules" / "seeder"
    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)

    def load(name: str) -> dict[str, Any]:
        with (module / name).open() as handle:
            return dict(hcl2.load(handle, serialization_options=options))

    documents = [
        d["aws_iam_policy_document"]["this"]
        for d in load("main.tf")["data"]
        if "aws_iam_policy_document" in d and "this" in d["aws_iam_policy_document"]
    ]
    (policy,) = documents
    readable = [r for st in policy["statement"] if "s3:GetObject" in st["actions"] for r in st["resources"]]
    assert readable == ["${var.weights_bucket_arn}/${var.weights_prefix}*"]
    (prefix,) = [
        v["weights_prefix"]["default"] for v in load("variables.tf")["variable"] if "weights_prefix" in v
    ]
    assert prefix == "models/"
    assert program_key(Target("b", "i", prefix=prefix).key_prefix).startswith(prefix)


def test_keep_running_leaves_the_seeder_up(aws: flow.AwsClients, tmp_path: Path) -> None:
    instance_id = _instance(aws, "stopped")
    target = _target(aws, instance_id)
    stubbed = boto3.client("ssm", region_name=REGION)
    with _ready_stub(stubbed, instance_id) as stub:
        stub.add_response(
            "get_command_invocation", {"Status": "Success", "StandardOutputContent": "RESULT {}"}
        )
        clients = flow.AwsClients(aws.s3, aws.ec2, SsmWithStubbedAgent(aws.ssm, stubbed))
        flow.rollback(clients, target, NAME, "r1", flow.RunOptions(keep_running=True))
    assert _state(aws, instance_id) == "running"
    _, command = aws.ssm.list_commands()["Commands"]
    assert command["Parameters"]["commands"][-1].endswith(
        "rollback --mount /mnt/models --require-mount --mount-wait 300 "
        f"--name {NAME} --revision r1 --lock-timeout 0"
    )


def test_command_failure_reports_the_error_tail(
    aws: flow.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    instance_id = _instance(aws, "running")
    target = _target(aws, instance_id)
    stubbed = boto3.client("ssm", region_name=REGION)
    stderr = (
        "syncing 4 files\nerror: manifest mismatch: s3://weights/models/x/r1/unet/a.safetensors has sha256 1"
    )
    with _ready_stub(stubbed, instance_id) as stub:
        stub.add_client_error("get_command_invocation", service_error_code="InvocationDoesNotExist")
        stub.add_response(
            "get_command_invocation", {"Status": "Failed", "ResponseCode": 1, "StandardErrorContent": stderr}
        )
        clients = flow.AwsClients(aws.s3, aws.ec2, SsmWithStubbedAgent(aws.ssm, stubbed))
        clock = FakeClock()
        with pytest.raises(SeedError) as caught:
            flow.rollback(clients, target, NAME, "r1", flow.RunOptions(sleep=clock.sleep, clock=clock))
    assert str(caught.value).startswith("the seeder's run Failed (exit 1): manifest mismatch: s3://weights")
    assert "  | syncing 4 files" in capsys.readouterr().err
    # It was running before, and nothing else runs on it: stopped all the same (#21 item 10).
    assert _state(aws, instance_id) in {"stopping", "stopped"}


def test_command_timeout_cancels(aws_env: dict[str, str]) -> None:
    ssm = boto3.client("ssm", region_name=REGION)
    clock = FakeClock()
    with Stubber(ssm) as stub:
        stub.add_response("send_command", {"Command": {"CommandId": COMMAND_ID}})
        for _ in range(9):  # polls at t = 0, 100, ... 800; the deadline is 600 + 60 + 120
            stub.add_response("get_command_invocation", {"Status": "InProgress"})
        stub.add_response("cancel_command", {}, {"CommandId": COMMAND_ID, "InstanceIds": ["i-1"]})
        with pytest.raises(SeedError, match=f"command {COMMAND_ID} on i-1 still InProgress after 60s"):
            run_command(
                ssm,
                "i-1",
                ["true"],
                execution_timeout=60,
                comment="c",
                poll_interval=100,
                sleep=clock.sleep,
                clock=clock,
            )
        stub.assert_no_pending_responses()
    assert clock.now == 800  # gave up at the first poll past delivery + execution timeout + margin


def test_a_command_cancelling_or_delayed_is_still_awaited(aws_env: dict[str, str]) -> None:
    """Cancelling and Delayed are not final (monitor-commands.html): the poll waits on them, as the stop
    rule does, both from one set (#21 item 10)."""
    from sd_lambda.seeding import remote, seeder

    assert seeder.FINISHED is remote.FINISHED == {"Success", "Failed", "Cancelled", "TimedOut"}
    ssm = boto3.client("ssm", region_name=REGION)
    clock = FakeClock()
    with Stubber(ssm) as stub:
        stub.add_response("send_command", {"Command": {"CommandId": COMMAND_ID}})
        for status in ("Delayed", "Cancelling", "Cancelled"):
            stub.add_response("get_command_invocation", {"Status": status})
        sent: set[str] = set()
        invocation = run_command(
            ssm, "i-1", ["true"], execution_timeout=60, comment="c", sleep=clock.sleep, clock=clock, sent=sent
        )
        stub.assert_no_pending_responses()
    assert (invocation.status, sent) == ("Cancelled", {COMMAND_ID})


def _invoke_response(payload: bytes, function_error: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "StatusCode": 200,
        "Payload": StreamingBody(io.BytesIO(payload), len(payload)),
    }
    if function_error:
        response["FunctionError"] = function_error
    return response


def test_warm_invokes_once(aws_env: dict[str, str]) -> None:
    client = boto3.client("lambda", region_name=REGION)
    expected = {"FunctionName": "sd", "InvocationType": "RequestResponse", "Payload": ANY}
    with Stubber(client) as stub:
        stub.add_response("invoke", _invoke_response(b'{"image": "x", "timings": {"load_ms": 9}}'), expected)
        assert flow.warm_function(client, "sd") == {"warm_timings": {"load_ms": 9}}
        stub.add_response(
            "invoke", _invoke_response(b'{"error": {"message": "model not seeded"}, "statusCode": 503}')
        )
        with pytest.raises(SeedError, match="warm-up invoke of sd failed: model not seeded"):
            flow.warm_function(client, "sd")
        stub.add_response("invoke", _invoke_response(b'{"errorMessage": "Task timed out"}', "Unhandled"))
        with pytest.raises(SeedError, match="failed: Task timed out"):
            flow.warm_function(client, "sd")


def test_multipart_upload_with_progress(
    aws: flow.AwsClients, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from boto3.s3.transfer import TransferConfig

    from sd_lambda.seeding.upload import upload_release

    _target(aws)  # creates the bucket
    folder = make_model(tmp_path / "m", "v1", files=1)
    big = folder / "unet" / "big.safetensors"
    big.write_bytes(bytes(range(256)) * (11 * 4096))  # 11 MiB: three 5 MiB parts
    release = from_dir(folder)
    small_parts = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    report = upload_release(aws.s3, "weights", "models/m/r1/", release, transfer_config=small_parts)
    head = aws.s3.head_object(Bucket="weights", Key="models/m/r1/unet/big.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # really multipart
    shas = {entry.path: entry.sha256 for entry in release.manifest.files}
    assert head["Metadata"][SHA256_METADATA] == shas["unet/big.safetensors"]
    assert report.uploaded_bytes == release.manifest.total_bytes
    progress = capsys.readouterr().err
    assert "upload: 100%" in progress
    assert "11.0M" in progress  # bytes
    assert "B/s" in progress  # rate
    again = upload_release(aws.s3, "weights", "models/m/r1/", release, transfer_config=small_parts)
    assert (again.uploaded_files, again.skipped_files) == (0, 3)


def test_program_ships_layout_and_sync_verbatim_and_deterministically() -> None:
    import zipfile

    import sd_lambda.layout
    import sd_lambda.seeding.efs_sync

    first = program_bytes()
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert archive.read("sd_lambda/layout.py") == Path(sd_lambda.layout.__file__).read_bytes()
        efs_sync_source = Path(sd_lambda.seeding.efs_sync.__file__).read_bytes()
        assert archive.read("sd_lambda/seeding/efs_sync.py") == efs_sync_source
    # The seeder has the standard library and nothing else.
    for source in (efs_sync_source, Path(sd_lambda.layout.__file__).read_bytes()):
        tree = ast.parse(source, feature_version=(3, 9))
        imported = {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert {name.split(".")[0] for name in imported} <= set(sys.stdlib_module_names) | {
            "__future__",
            "sd_lambda",
        }
        assert {name for name in imported if name.startswith("sd_lambda")} <= {"sd_lambda.layout"}
    program_bytes.cache_clear()
    assert program_bytes() == first


def test_seeder_started_is_stopped_when_the_agent_never_comes(aws: flow.AwsClients) -> None:
    instance_id = _instance(aws, "stopped")
    target = _target(aws, instance_id)
    stubbed = boto3.client("ssm", region_name=REGION)
    clock = FakeClock()
    options = flow.RunOptions(online_timeout=20, poll_interval=10, sleep=clock.sleep, clock=clock)
    with _online_stub(stubbed, [None, None, None], instance_id) as stub:
        clients = flow.AwsClients(aws.s3, aws.ec2, SsmWithStubbedAgent(aws.ssm, stubbed))
        with pytest.raises(SeedError, match="not Online after 20s"):
            flow.rollback(clients, target, NAME, "r1", options)
        stub.assert_no_pending_responses()
    assert _state(aws, instance_id) in {"stopping", "stopped"}
    assert aws.ssm.list_commands()["Commands"] == []  # nothing was sent
