"""The deploy driver: staging against real Terraform (fixture stack), AWS parts against moto / Stubber."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from sd_lambda.cli import main as cli_main
from sd_lambda.ops import deploy
from sd_lambda.ops.deploy import DeployOptions, parse_pinned_image, read_digest, wait_until_ready
from sd_lambda.ops.stack_outputs import StackError, StackTerraform, read_outputs

pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")

REGION = "us-east-1"
REPOSITORY_URL = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sd-lambda"
FIXTURE_TARGETS = ("terraform_data.repository",)
FIXTURE_FUNCTION = "terraform_data.function[0]"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield


def push_image_to_moto(repository: str = "sd-lambda") -> str:
    """Create the repository and an image in moto ECR; returns the image digest."""
    ecr = boto3.client("ecr", region_name=REGION)
    ecr.create_repository(repositoryName=repository)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}
    image = ecr.put_image(repositoryName=repository, imageManifest=json.dumps(manifest), imageTag="build-1")
    return image["image"]["imageId"]["imageDigest"]


def create_function_in_moto(image_uri: str, name: str = "sd-lambda") -> None:
    iam = boto3.client("iam", region_name=REGION)
    role = iam.create_role(RoleName=f"{name}-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    boto3.client("lambda", region_name=REGION).create_function(
        FunctionName=name, Role=role, PackageType="Image", Code={"ImageUri": image_uri}, MemorySize=3008
    )


class FakeStack:
    """Records Terraform calls; outputs come from what has been 'applied'; plans show ``planned_changes``."""

    def __init__(self, outputs_after_full_apply: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.applied_outputs: dict[str, Any] = {}
        self.planned_changes: list[dict[str, Any]] = []
        self.targeted_changes: list[dict[str, Any]] = []
        self.plan_targets: tuple[str, ...] = ()
        self.apply_error: Exception | None = None
        self.full_outputs = outputs_after_full_apply or {
            "ecr_repository_url": REPOSITORY_URL,
            "function_name": "sd-lambda",
            "function_url": "https://x.lambda-url.us-east-1.on.aws/",
            "region": REGION,
        }

    def init(self, backend_config: Path | None = None, migrate_state: bool = False) -> None:
        self.calls.append(("init", {"backend_config": backend_config, "migrate_state": migrate_state}))

    def plan(
        self,
        variables: dict[str, Any],
        var_files: tuple[Path, ...] = (),
        out: Path | None = None,
        targets: tuple[str, ...] = (),
    ) -> None:
        call: dict[str, Any] = {"variables": dict(variables)}
        if targets:
            call["targets"] = tuple(targets)
        self.calls.append(("plan", call))
        self.plan_file = out
        self.plan_targets = tuple(targets)

    def show_plan(self, plan_file: Path) -> dict[str, Any]:
        assert plan_file == self.plan_file
        changes = self.targeted_changes if self.plan_targets else self.planned_changes
        return {"resource_changes": changes}

    def apply_plan(self, plan_file: Path) -> None:
        assert plan_file == self.plan_file
        self.calls.append(("apply_plan", {"variables": self.calls[-1][1]["variables"]}))
        if self.plan_targets:
            self.applied_outputs = {**self.applied_outputs, "ecr_repository_url": REPOSITORY_URL}
        else:
            self.applied_outputs = dict(self.full_outputs)
        if self.apply_error is not None and not self.plan_targets:  # the full apply fails
            raise self.apply_error

    def destroy(self, variables: dict[str, Any], var_files: tuple[Path, ...] = ()) -> None:
        self.calls.append(("destroy", {"variables": dict(variables)}))

    def outputs(self) -> dict[str, Any]:
        return dict(self.applied_outputs)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


PUSH_SCRIPT = """
import json, os, pathlib, sys
stack, record = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[3])
digest = sys.argv[2]
state = json.loads((stack / "terraform.tfstate").read_text())
record.write_text(json.dumps({
    "repository_url": os.environ["ECR_REPOSITORY_URL"],
    "make_repository_url": os.environ["REPOSITORY_URL"],
    "resources_at_push": sorted(r["type"] + "." + r["name"] for r in state["resources"]),
}))
(stack.parent / ".image-digest").write_text(digest + "\\n")
"""


def test_apply_creates_the_registry_pushes_then_deploys_the_pinned_image(
    terraform_on_path: Path, deploy_stack: Path, aws: None, tmp_path: Path
) -> None:
    digest = push_image_to_moto()
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    script = tmp_path / "push.py"
    script.write_text(PUSH_SCRIPT)
    record = tmp_path / "push-record.json"
    options = DeployOptions(
        infra_dir=deploy_stack,
        region=REGION,
        digest_file=deploy_stack.parent / ".image-digest",
        push_command=f"{sys.executable} {script} {deploy_stack} {digest} {record}",
        variables={"memory_size": "3008"},
        registry_targets=FIXTURE_TARGETS,
        wait_seconds=30,
    )

    outputs = deploy.apply(options, StackTerraform(deploy_stack, env=options.terraform_env))

    pushed = json.loads(record.read_text())
    assert pushed["repository_url"] == pushed["make_repository_url"] == REPOSITORY_URL
    assert pushed["resources_at_push"] == ["terraform_data.repository"]  # registry only, then the push
    assert outputs["deployed_image_uri"] == f"{REPOSITORY_URL}@{digest}"
    assert outputs["deployed_memory_size"] == 3008
    assert read_outputs(deploy_stack)["function_name"] == "sd-lambda"


def test_destroy_with_confirmation_flag_empties_the_state(
    terraform_on_path: Path, deploy_stack: Path, aws: None, capfd: pytest.CaptureFixture
) -> None:
    digest = push_image_to_moto()
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    image_uri = f"{REPOSITORY_URL}@{digest}"
    deploy.apply(
        DeployOptions(infra_dir=deploy_stack, image_uri=image_uri, registry_targets=FIXTURE_TARGETS),
        StackTerraform(deploy_stack),
    )

    capfd.readouterr()

    code = cli_main(["deploy", "destroy", "--infra", str(deploy_stack), "--yes", "--json"])

    assert code == 0
    assert StackTerraform(deploy_stack).outputs() == {}
    out, err = capfd.readouterr()
    # terraform's own output (a child process writing to file descriptor 1) went to stderr with --json
    assert json.loads(out) == {"destroyed": str(deploy_stack)}
    assert "Destroy complete" in err


def test_plan_json_lists_the_changes_on_stdout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = FakeStack()
    stack.applied_outputs = dict(DEPLOYED)
    stack.planned_changes = [
        {"address": "module.lambda.aws_lambda_function.this[0]", "change": {"actions": ["update"]}},
        {"address": "data.aws_region.current", "change": {"actions": ["read"]}},
        {"address": "aws_kms_key.this[0]", "change": {"actions": ["no-op"]}},
    ]
    monkeypatch.setattr(deploy, "_stack", lambda options: stack)

    argv = ["deploy", "plan", "--infra", str(tmp_path), "--digest-file", str(tmp_path / "none")]
    assert cli_main([*argv, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == {
        "image_uri": f"{REPOSITORY_URL}@{DIGEST}",
        "changes": [{"address": "module.lambda.aws_lambda_function.this[0]", "actions": ["update"]}],
    }

    assert cli_main(argv) == 0  # for people: one line per change
    assert "update           module.lambda.aws_lambda_function.this[0]" in capsys.readouterr().out


def test_apply_json_prints_the_stack_outputs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(deploy, "_stack", lambda options: FakeStack())
    monkeypatch.setattr(deploy, "stack_values", lambda options: None)
    monkeypatch.setattr(deploy, "preflight", lambda options, **checks: print("preflight: ok"))
    monkeypatch.setattr(deploy, "apply", lambda options, stack, values: dict(DEPLOYED))

    assert cli_main(["deploy", "apply", "--infra", str(tmp_path), "--image-uri", "x", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"outputs": DEPLOYED}
    assert "preflight: ok" in captured.err


def test_apply_with_image_uri_skips_the_push_and_pins_that_image(aws: None) -> None:
    digest = push_image_to_moto()
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    stack = FakeStack()
    options = DeployOptions(image_uri=f"{REPOSITORY_URL}@{digest}", push_command="false", wait_seconds=10)

    deploy.apply(options, stack)

    assert stack.names == ["init", "plan", "apply_plan", "plan", "apply_plan"]
    assert stack.calls[1][1]["targets"] == deploy.REGISTRY_TARGETS
    assert "image_uri" not in stack.calls[1][1]["variables"]
    assert stack.calls[4][1] == {"variables": {"image_uri": f"{REPOSITORY_URL}@{digest}"}}


@pytest.mark.parametrize(
    "image_uri",
    [
        f"{REPOSITORY_URL}:latest",
        f"{REPOSITORY_URL}:v1",
        "docker.io/library/python@" + DIGEST,
        f"{REPOSITORY_URL}@sha256:abc",
    ],
)
def test_apply_refuses_unpinned_images_before_the_full_apply(image_uri: str) -> None:
    stack = FakeStack()

    with pytest.raises(StackError, match="not an ECR image pinned by digest"):
        deploy.apply(DeployOptions(image_uri=image_uri), stack)

    assert stack.names == ["init", "plan", "apply_plan"]  # the registry stage only


def test_apply_refuses_a_digest_the_registry_does_not_have(aws: None, tmp_path: Path) -> None:
    push_image_to_moto()
    digest_file = tmp_path / ".image-digest"
    digest_file.write_text(DIGEST)
    stack = FakeStack()

    with pytest.raises(StackError, match=r"is not in ECR repository sd-lambda: push it first"):
        deploy.apply(DeployOptions(digest_file=digest_file), stack)

    assert stack.names == ["init", "plan", "apply_plan"]  # the registry stage only


def test_apply_without_any_image_explains_how_to_get_one(tmp_path: Path) -> None:
    stack = FakeStack()

    with pytest.raises(
        StackError, match=r"no image digest: .* does not exist.*\(`make push-image`\), or pass --image-uri "
    ):
        deploy.apply(DeployOptions(digest_file=tmp_path / ".image-digest"), stack)


def test_failing_push_command_stops_the_deploy(tmp_path: Path) -> None:
    stack = FakeStack()

    with pytest.raises(StackError, match=r"push command 'false' failed \(exit 1\)"):
        deploy.apply(DeployOptions(push_command="false", digest_file=tmp_path / "d"), stack)
    assert stack.names == ["init", "plan", "apply_plan"]


@pytest.mark.parametrize(
    "content",
    [DIGEST, DIGEST + "\n", f"{REPOSITORY_URL}@{DIGEST}\n", "ab" * 32],
)
def test_digest_file_formats(tmp_path: Path, content: str) -> None:
    path = tmp_path / ".image-digest"
    path.write_text(content)

    assert read_digest(path) == DIGEST


def test_digest_file_without_a_digest_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / ".image-digest"
    path.write_text("latest\n")

    with pytest.raises(StackError, match="holds no sha256"):
        read_digest(path)


def test_pinned_image_parts() -> None:
    image = parse_pinned_image(f"111122223333.dkr.ecr.eu-west-1.amazonaws.com/team/sd@{DIGEST}")

    assert (image.region, image.repository, image.digest) == ("eu-west-1", "team/sd", DIGEST)


def test_wait_returns_once_the_function_is_active(aws: None) -> None:
    digest = push_image_to_moto()
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}", name="waited")

    configuration = wait_until_ready(boto3.client("lambda", region_name=REGION), "waited", 30)

    assert configuration["State"] == "Active"
    assert configuration["MemorySize"] == 3008


def test_wait_reports_why_the_function_failed() -> None:
    client = boto3.client("lambda", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="y")
    failed = {
        "Configuration": {
            "FunctionName": "sd-lambda",
            "State": "Failed",
            "StateReason": "EFS file system is not reachable",
            "StateReasonCode": "EFSMountConnectivityError",
        }
    }
    with Stubber(client) as stubber:
        stubber.add_response("get_function", failed, {"FunctionName": "sd-lambda"})

        with pytest.raises(StackError, match=r"State=Failed.*EFS file system is not reachable"):
            wait_until_ready(client, "sd-lambda", 30)


def test_plan_without_an_image_plans_everything_but_the_function(tmp_path: Path) -> None:
    stack = FakeStack()

    assert (
        deploy.plan(DeployOptions(region="eu-west-1", digest_file=tmp_path / "none"), stack).image_uri is None
    )
    assert stack.calls[-1] == ("plan", {"variables": {"region": "eu-west-1"}})
    assert "apply_plan" not in stack.names


def test_plan_uses_the_pushed_digest_once_the_registry_exists(tmp_path: Path) -> None:
    stack = FakeStack()
    stack.applied_outputs = {"ecr_repository_url": REPOSITORY_URL}
    digest_file = tmp_path / ".image-digest"
    digest_file.write_text(DIGEST)

    deploy.plan(DeployOptions(digest_file=digest_file), stack)

    assert stack.calls[-1] == ("plan", {"variables": {"image_uri": f"{REPOSITORY_URL}@{DIGEST}"}})


def test_destroy_asks_and_stops_unless_the_answer_is_destroy() -> None:
    stack = FakeStack()
    prompts: list[str] = []

    def answer_no(prompt: str) -> str:
        prompts.append(prompt)
        return "yes"

    with pytest.raises(StackError, match="destroy cancelled"):
        deploy.destroy(DeployOptions(), stack, confirmed=False, ask=answer_no)
    assert "destroy" not in stack.names
    assert "Type 'destroy' to confirm" in prompts[0]

    deploy.destroy(DeployOptions(), stack, confirmed=False, ask=lambda _: "destroy")
    assert stack.names[-1] == "destroy"


def test_destroy_without_a_terminal_needs_confirm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    stack = FakeStack()

    with pytest.raises(StackError, match="rerun with --yes"):
        deploy.destroy(DeployOptions(), stack, confirmed=False)
    assert stack.names == []


def test_cli_without_terraform_prints_one_line(
    no_terraform_on_path: None, capfd: pytest.CaptureFixture, tmp_path: Path
) -> None:
    code = cli_main(["deploy", "plan", "--infra", str(tmp_path)])

    err = capfd.readouterr().err
    assert code == 1
    assert err.strip() == (
        "sd-lambda deploy: error: terraform is not on PATH: install Terraform >= 1.6 "
        "(https://developer.hashicorp.com/terraform/install) and put it on PATH"
    )


def test_cli_rejects_a_tagged_image_with_one_line(
    terraform_on_path: Path, deploy_stack: Path, capfd: pytest.CaptureFixture
) -> None:
    code = cli_main(
        ["deploy", "plan", "--infra", str(deploy_stack), "--image-uri", f"{REPOSITORY_URL}:latest"]
    )

    assert code == 1
    assert "tags like :latest are refused" in capfd.readouterr().err.splitlines()[-1]


################################################################################
# Keeping the live function: the deployed image is reused, deleting it needs a flag
################################################################################

DEPLOYED = {
    "ecr_repository_url": REPOSITORY_URL,
    "function_name": "sd-lambda",
    "image_uri": f"{REPOSITORY_URL}@{DIGEST}",
    "region": REGION,
}
DELETE_FUNCTION = {"address": deploy.FUNCTION_ADDRESS, "change": {"actions": ["delete"]}}


def test_plan_without_a_new_image_keeps_the_deployed_one(tmp_path: Path) -> None:
    stack = FakeStack()
    stack.applied_outputs = dict(DEPLOYED)

    image_uri = deploy.plan(DeployOptions(digest_file=tmp_path / "none"), stack).image_uri

    assert image_uri == f"{REPOSITORY_URL}@{DIGEST}"
    assert stack.calls[-1] == ("plan", {"variables": {"image_uri": f"{REPOSITORY_URL}@{DIGEST}"}})


def test_apply_without_a_new_image_redeploys_the_deployed_one(aws: None, tmp_path: Path) -> None:
    digest = push_image_to_moto()
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    stack = FakeStack({**DEPLOYED, "image_uri": f"{REPOSITORY_URL}@{digest}"})
    stack.applied_outputs = {**DEPLOYED, "image_uri": f"{REPOSITORY_URL}@{digest}"}

    deploy.apply(DeployOptions(digest_file=tmp_path / "none", wait_seconds=10), stack)

    assert stack.names == ["init", "plan", "apply_plan", "plan", "apply_plan"]
    assert stack.calls[-1][1]["variables"] == {"image_uri": f"{REPOSITORY_URL}@{digest}"}


@pytest.mark.parametrize(("actions", "verb"), [(["delete"], "delete"), (["delete", "create"], "replace")])
def test_plan_that_deletes_the_live_function_is_refused_unless_allowed(
    tmp_path: Path, actions: list[str], verb: str
) -> None:
    stack = FakeStack()
    stack.planned_changes = [{"address": deploy.FUNCTION_ADDRESS, "change": {"actions": actions}}]

    with pytest.raises(StackError) as refused:
        deploy.plan(DeployOptions(digest_file=tmp_path / "none"), stack)

    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"refusing to {verb} the live function (module.lambda.aws_lambda_function")
    assert message.endswith("or allow it with --allow-function-delete")
    deploy.plan(DeployOptions(digest_file=tmp_path / "none", allow_function_delete=True), stack)


def test_apply_never_applies_a_plan_that_deletes_the_live_function(aws: None) -> None:
    digest = push_image_to_moto()
    stack = FakeStack()
    stack.planned_changes = [
        {"address": "module.lambda.aws_lambda_function_url.this[0]", "change": {"actions": ["update"]}},
        {"address": deploy.FUNCTION_ADDRESS, "change": {"actions": ["create", "delete"]}},
    ]

    with pytest.raises(StackError, match="refusing to replace the live function"):
        deploy.apply(DeployOptions(image_uri=f"{REPOSITORY_URL}@{digest}"), stack)

    assert stack.names == ["init", "plan", "apply_plan", "plan"]  # planned, never applied


def test_image_from_another_region_than_the_stack_is_refused(tmp_path: Path) -> None:
    stack = FakeStack()
    stack.applied_outputs = dict(DEPLOYED)  # region us-east-1
    elsewhere = f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd-lambda@{DIGEST}"

    with pytest.raises(StackError, match=r"is in region eu-west-1 but the stack deploys to us-east-1"):
        deploy.plan(DeployOptions(image_uri=elsewhere), stack)
    with pytest.raises(StackError, match=r"is in region eu-west-1 but the stack deploys to ap-south-1"):
        deploy.apply(DeployOptions(image_uri=elsewhere, region="ap-south-1"), stack)
    assert [call for call in stack.calls if call[0] == "plan" and "targets" not in call[1]] == []


def test_real_plan_without_an_image_keeps_the_function_of_the_fixture_stack(
    terraform_on_path: Path, deploy_stack: Path, aws: None
) -> None:
    digest = push_image_to_moto()
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    deploy.apply(
        DeployOptions(infra_dir=deploy_stack, image_uri=f"{REPOSITORY_URL}@{digest}", **_fixture()),
        StackTerraform(deploy_stack),
    )

    image_uri = deploy.plan(
        DeployOptions(infra_dir=deploy_stack, digest_file=deploy_stack / "none", **_fixture()),
        StackTerraform(deploy_stack),
    ).image_uri

    assert image_uri == f"{REPOSITORY_URL}@{digest}"  # planned with it: the function stays


def test_real_plan_that_would_delete_the_function_is_refused_with_one_line(
    terraform_on_path: Path, deploy_stack: Path, aws: None, capfd: pytest.CaptureFixture
) -> None:
    # A stack applied before it had the image_uri output: nothing tells the driver which image runs.
    main_tf = deploy_stack / "main.tf"
    text = main_tf.read_text()
    start = text.index('output "image_uri" {')
    main_tf.write_text(text[:start] + text[text.index("}", start) + 1 :])
    digest = push_image_to_moto()
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    deploy.apply(
        DeployOptions(infra_dir=deploy_stack, image_uri=f"{REPOSITORY_URL}@{digest}", **_fixture()),
        StackTerraform(deploy_stack),
    )
    capfd.readouterr()
    options = DeployOptions(infra_dir=deploy_stack, digest_file=deploy_stack / "none", **_fixture())

    with pytest.raises(StackError) as refused:
        deploy.plan(options, StackTerraform(deploy_stack))

    assert str(refused.value).startswith("refusing to delete the live function (terraform_data.function[0])")
    allowed = DeployOptions(
        infra_dir=deploy_stack, digest_file=deploy_stack / "none", allow_function_delete=True, **_fixture()
    )
    assert deploy.plan(allowed, StackTerraform(deploy_stack)).image_uri is None
    assert StackTerraform(deploy_stack).outputs()["deployed_image_uri"] == f"{REPOSITORY_URL}@{digest}"


def _fixture() -> dict[str, Any]:
    return {"registry_targets": FIXTURE_TARGETS, "function_address": FIXTURE_FUNCTION}


@pytest.mark.parametrize(
    ("flag", "option"),
    [("--allow-function-delete", "allow_function_delete"), ("--allow-data-loss", "allow_data_loss")],
)
@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("action", ["plan", "apply"])
def test_cli_passes_the_protection_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, action: str, given: bool, flag: str, option: str
) -> None:
    seen: list[DeployOptions] = []
    monkeypatch.setattr(deploy, "_stack", lambda options: FakeStack())
    monkeypatch.setattr(deploy, "preflight", lambda options, **checks: None)
    monkeypatch.setattr(
        deploy,
        action,
        lambda options, stack, *rest, **more: seen.append(options) or deploy.PlanSummary(None, []),
    )

    assert cli_main(["deploy", action, "--infra", str(tmp_path), *([flag] if given else [])]) == 0

    assert getattr(seen[0], option) is given
    assert seen[0].function_address == deploy.FUNCTION_ADDRESS


################################################################################
# No silent destruction of data: EFS, access point, bucket, KMS key, ECR repository
################################################################################

PROTECTED = [
    ("module.efs.aws_efs_file_system.this", "aws_efs_file_system", "EFS file system: every seeded model"),
    ("module.efs.aws_efs_access_point.this", "aws_efs_access_point", "EFS access point"),
    ("module.weights_bucket.aws_s3_bucket.this[0]", "aws_s3_bucket", "weights bucket"),
    ("aws_kms_key.this[0]", "aws_kms_key", "KMS key"),
    ("module.lambda.aws_ecr_repository.this", "aws_ecr_repository", "ECR repository: every pushed image"),
    # The stack called as a module: addresses gain a prefix, the type stays.
    ("module.sd.module.efs.aws_efs_file_system.this", "aws_efs_file_system", "EFS file system"),
]


def _change(address: str, type_name: str, actions: list[str], mode: str = "managed") -> dict[str, Any]:
    return {"address": address, "mode": mode, "type": type_name, "change": {"actions": actions}}


@pytest.mark.parametrize(("address", "type_name", "what"), PROTECTED)
@pytest.mark.parametrize(("actions", "verb"), [(["delete"], "delete"), (["delete", "create"], "replace")])
def test_plan_that_destroys_data_is_refused_unless_allowed(
    tmp_path: Path, address: str, type_name: str, what: str, actions: list[str], verb: str
) -> None:
    stack = FakeStack()
    stack.planned_changes = [_change(address, type_name, actions)]

    with pytest.raises(StackError) as refused:
        deploy.plan(DeployOptions(digest_file=tmp_path / "none"), stack)

    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"refusing a plan that would {verb} {address} ({what}")
    assert "rerun with --allow-data-loss; otherwise" in message
    deploy.plan(DeployOptions(digest_file=tmp_path / "none", allow_data_loss=True), stack)


def test_updates_and_data_sources_are_not_data_loss(tmp_path: Path) -> None:
    stack = FakeStack()
    stack.planned_changes = [
        _change("module.efs.aws_efs_file_system.this", "aws_efs_file_system", ["update"]),
        _change("module.weights_bucket.aws_s3_bucket.this[0]", "aws_s3_bucket", ["no-op"]),
        _change("data.aws_kms_key.caller", "aws_kms_key", ["delete"], mode="data"),
        _change('module.efs.aws_efs_mount_target.this["a"]', "aws_efs_mount_target", ["delete", "create"]),
    ]

    deploy.plan(DeployOptions(digest_file=tmp_path / "none"), stack)


def test_all_losses_are_named_in_one_line(tmp_path: Path) -> None:
    stack = FakeStack()
    stack.planned_changes = [
        _change(address, type_name, ["delete"]) for address, type_name, _ in PROTECTED[:3]
    ]

    with pytest.raises(StackError) as refused:
        deploy.plan(DeployOptions(digest_file=tmp_path / "none"), stack)

    assert [address in str(refused.value) for address, _, _ in PROTECTED[:3]] == [True, True, True]


def test_targeted_stage_one_never_applies_a_plan_that_replaces_the_repository(tmp_path: Path) -> None:
    stack = FakeStack()
    stack.targeted_changes = [
        _change("module.lambda.aws_ecr_repository.this", "aws_ecr_repository", ["create", "delete"])
    ]

    with pytest.raises(StackError, match=r"would replace module\.lambda\.aws_ecr_repository\.this"):
        deploy.apply(DeployOptions(image_uri=f"{REPOSITORY_URL}@{DIGEST}"), stack)

    assert stack.names == ["init", "plan"]  # planned with -target, never applied
    assert stack.calls[1][1]["targets"] == deploy.REGISTRY_TARGETS


def test_full_apply_never_applies_a_plan_that_replaces_the_file_system(aws: None) -> None:
    digest = push_image_to_moto()
    stack = FakeStack()
    stack.planned_changes = [
        _change("module.efs.aws_efs_file_system.this", "aws_efs_file_system", ["delete", "create"])
    ]

    with pytest.raises(StackError, match=r"would replace module\.efs\.aws_efs_file_system\.this"):
        deploy.apply(DeployOptions(image_uri=f"{REPOSITORY_URL}@{digest}"), stack)
    assert stack.names == ["init", "plan", "apply_plan", "plan"]

    allowed = FakeStack()
    allowed.planned_changes = stack.planned_changes
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    deploy.apply(DeployOptions(image_uri=f"{REPOSITORY_URL}@{digest}", allow_data_loss=True), allowed)
    assert allowed.names[-1] == "apply_plan"


################################################################################
# The image Lambda is handed must be a single manifest (ECR imageManifestMediaType)
################################################################################

ATTESTED_INDEX = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "d" * 64},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "e" * 64},
    ],
}


def test_apply_refuses_an_image_index_before_the_full_apply(aws: None) -> None:
    ecr = boto3.client("ecr", region_name=REGION)
    ecr.create_repository(repositoryName="sd-lambda")
    pushed = ecr.put_image(repositoryName="sd-lambda", imageManifest=json.dumps(ATTESTED_INDEX), imageTag="x")
    image_uri = f"{REPOSITORY_URL}@{pushed['image']['imageId']['imageDigest']}"
    stack = FakeStack()

    with pytest.raises(StackError) as refused:
        deploy.apply(DeployOptions(image_uri=image_uri), stack)

    assert str(refused.value) == (
        f"{image_uri} is an image index (attestations or several platforms), which Lambda refuses: rebuild "
        "with `make build-image` (buildx --provenance=false --sbom=false, one platform) and push again"
    )
    assert stack.names == ["init", "plan", "apply_plan"]  # the registry stage only


@pytest.mark.parametrize(
    "media_type",
    ["application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json"],
)
def test_single_manifests_lambda_supports_pass(media_type: str) -> None:
    client = boto3.client("ecr", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="y")
    image = parse_pinned_image(f"{REPOSITORY_URL}@{DIGEST}")
    detail = {"imageDigest": DIGEST, "imageManifestMediaType": media_type, "repositoryName": "sd-lambda"}
    with Stubber(client) as stubber:
        stubber.add_response("describe_images", {"imageDetails": [detail]}, {"repositoryName": "sd-lambda"})
        deploy.verify_image(deploy.repository_images(client, image), image)
        stubber.assert_no_pending_responses()


################################################################################
# CreateFunction refused for memory: the terraform error becomes the preflight's one-line advice
################################################################################

# What terraform (AWS provider v6) prints when a new account's CreateFunction asks for 10240 MB.
MEMORY_REFUSAL = """
╷
│ Error: creating Lambda Function (sd-lambda): operation error Lambda: CreateFunction, https response
│ error StatusCode: 400, RequestID: 0f6e1c9a-2b1d-4c55-9d0e-6f3a0c2b7e11, InvalidParameterValueException:
│ 'MemorySize' value failed to satisfy constraint: Member must have value less than or equal to 3008
│
│   with module.lambda.aws_lambda_function.this[0],
│   on modules/lambda/main.tf line 193, in resource "aws_lambda_function" "this":
│  193: resource "aws_lambda_function" "this" {
│
╵
"""


def test_memory_refusal_at_create_function_becomes_the_advice_line(aws: None) -> None:
    from sd_lambda.ops.stack_outputs import TerraformCommandError

    digest = push_image_to_moto()
    stack = FakeStack()
    stack.apply_error = TerraformCommandError(
        "terraform apply failed in infra (exit 1): Error: creating Lambda Function (sd-lambda): operation "
        "error Lambda: CreateFunction, https response",
        MEMORY_REFUSAL,
    )
    options = DeployOptions(
        infra_dir=Path(__file__).parents[2] / "infra", image_uri=f"{REPOSITORY_URL}@{digest}"
    )

    with pytest.raises(StackError) as refused:
        deploy.apply(options, stack)

    assert str(refused.value) == (
        "Lambda refused the function's memory: memory_size=10240 MB is above the 3008 MB a new account may "
        "use: set memory_size = 3008 (--var-file... or --var memory_size=3008), or request higher Lambda "
        "quotas (Service Quotas > AWS Lambda > 'Concurrent executions' (L-B99A9384); AWS also raises them "
        "with use)"
    )


def test_other_apply_errors_pass_through_unchanged(aws: None) -> None:
    from sd_lambda.ops.stack_outputs import TerraformCommandError

    digest = push_image_to_moto()
    stack = FakeStack()
    error = TerraformCommandError("terraform apply failed in infra (exit 1): Error: AccessDenied", "Error: x")
    stack.apply_error = error

    with pytest.raises(TerraformCommandError) as raised:
        deploy.apply(DeployOptions(image_uri=f"{REPOSITORY_URL}@{digest}"), stack)

    assert raised.value is error


################################################################################
# Item 17: the digest the function runs carries a deployed-* tag the ECR lifecycle keeps
################################################################################


def _tags_of(digest: str) -> list[str]:
    ecr = boto3.client("ecr", region_name=REGION)
    details = ecr.describe_images(repositoryName="sd-lambda", imageIds=[{"imageDigest": digest}])
    return details["imageDetails"][0].get("imageTags", [])


def test_apply_tags_the_deployed_digest_for_the_lifecycle_to_keep(aws: None) -> None:
    digest = push_image_to_moto()
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")

    deploy.apply(DeployOptions(image_uri=f"{REPOSITORY_URL}@{digest}", wait_seconds=10), FakeStack())

    deployed = [tag for tag in _tags_of(digest) if tag.startswith("deployed-")]
    assert len(deployed) == 1
    assert re.fullmatch(r"deployed-\d{8}T\d{6}Z", deployed[0])
    assert "build-1" in _tags_of(digest)  # the push tag stays: a tag is added, none is moved


def test_a_failed_apply_tags_nothing(aws: None) -> None:
    from sd_lambda.ops.stack_outputs import TerraformCommandError

    digest = push_image_to_moto()
    stack = FakeStack()
    stack.apply_error = TerraformCommandError(
        "terraform apply failed in infra (exit 1): Error: x", "Error: x"
    )

    with pytest.raises(TerraformCommandError):
        deploy.apply(DeployOptions(image_uri=f"{REPOSITORY_URL}@{digest}"), stack)

    assert _tags_of(digest) == ["build-1"]


def test_the_same_tag_twice_is_not_an_error(aws: None) -> None:
    """PutImage answers ImageAlreadyExistsException when the digest already has the tag."""
    from sd_lambda.ops.container.registry import add_tag

    digest = push_image_to_moto()
    ecr = boto3.client("ecr", region_name=REGION)

    add_tag(ecr, "sd-lambda", digest, "deployed-20260101T000000Z")
    add_tag(ecr, "sd-lambda", digest, "deployed-20260101T000000Z")

    assert sorted(_tags_of(digest)) == ["build-1", "deployed-20260101T000000Z"]


@pytest.mark.parametrize("operation", ["batch_get_image", "put_image"])
def test_a_tagging_refusal_is_one_line_naming_both_permissions(operation: str) -> None:
    client = boto3.client("ecr", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="y")
    image = parse_pinned_image(f"{REPOSITORY_URL}@{DIGEST}")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"})
    with Stubber(client) as stubber:
        if operation == "put_image":
            stubber.add_response(
                "batch_get_image",
                {
                    "images": [
                        {
                            "imageId": {"imageDigest": DIGEST},
                            "imageManifest": manifest,
                            "imageManifestMediaType": "application/vnd.oci.image.manifest.v1+json",
                        }
                    ],
                    "failures": [],
                },
            )
        stubber.add_client_error(operation, "AccessDeniedException", "not authorized to perform")
        with pytest.raises(StackError) as refused:
            deploy.mark_deployed(client, image)

    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"the function runs {image.uri}, but could not tag")
    assert "ecr:BatchGetImage and ecr:PutImage" in message


def _push_in_order(count: int) -> list[str]:
    """``count`` distinct images in moto ECR, pushed one second apart (moto records whole seconds)."""
    from moto.ecr.models import ecr_backends

    ecr = boto3.client("ecr", region_name=REGION)
    ecr.create_repository(repositoryName="sd-lambda")
    digests = []
    for index in range(count):
        # moto derives the digest from the layers' digests, and picks one of 101 at random without layers:
        # distinct layers give distinct, repeatable digests.
        layer = {
            "digest": f"sha256:{index:064x}",
            "size": 1,
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "layers": [layer],
        }
        pushed = ecr.put_image(
            repositoryName="sd-lambda", imageManifest=json.dumps(manifest), imageTag=f"git-{index}"
        )
        digests.append(pushed["image"]["imageId"]["imageDigest"])
    assert len(set(digests)) == count
    images = ecr_backends["123456789012"][REGION].repositories["sd-lambda"].images
    for image in images:
        image.image_pushed_at = 1_700_000_000 + digests.index(image.image_digest)
    return digests


def test_a_rollback_the_lifecycle_would_expire_is_refused_before_the_full_apply(aws: None) -> None:
    """The deployed-* rule ranks by push time; a retag does not move an old image up (item 17)."""
    from sd_lambda.ops.container.registry import add_tag

    oldest, *newer = _push_in_order(4)
    ecr = boto3.client("ecr", region_name=REGION)
    for index, digest in enumerate(newer):
        add_tag(ecr, "sd-lambda", digest, f"deployed-2026010{index + 1}T000000Z")
    stack = FakeStack()

    with pytest.raises(StackError) as refused:
        deploy.apply(DeployOptions(image_uri=f"{REPOSITORY_URL}@{oldest}", wait_seconds=10), stack)

    assert str(refused.value).endswith(
        "set ecr_keep_deployments = 4 (--var-file... or --var ecr_keep_deployments=4)"
    )
    assert stack.names == ["init", "plan", "apply_plan"]  # the targeted registry stage only


def test_a_rollback_within_the_kept_deployments_goes_ahead(aws: None) -> None:
    from sd_lambda.ops.container.registry import add_tag

    oldest, *newer = _push_in_order(4)
    create_function_in_moto(f"{REPOSITORY_URL}@{oldest}")
    ecr = boto3.client("ecr", region_name=REGION)
    for index, digest in enumerate(newer):
        add_tag(ecr, "sd-lambda", digest, f"deployed-2026010{index + 1}T000000Z")
    options = DeployOptions(
        image_uri=f"{REPOSITORY_URL}@{oldest}", variables={"ecr_keep_deployments": "4"}, wait_seconds=10
    )
    stack = FakeStack()

    deploy.apply(options, stack)

    assert stack.names == ["init", "plan", "apply_plan", "plan", "apply_plan"]
    assert len([tag for tag in _tags_of(oldest) if tag.startswith("deployed-")]) == 1


################################################################################
# Review of #21: AWS refusals are one line, the var files are read once, one ECR client and listing
################################################################################

INFRA = Path(__file__).parents[2] / "infra"


def test_a_refused_image_listing_is_one_line_naming_describe_images() -> None:
    client = boto3.client("ecr", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="y")
    image = parse_pinned_image(f"{REPOSITORY_URL}@{DIGEST}")
    with Stubber(client) as stubber:
        stubber.add_client_error(
            "describe_images", "AccessDeniedException", "not authorized to perform: ecr:DescribeImages"
        )
        with pytest.raises(StackError) as refused:
            deploy.repository_images(client, image)

    assert str(refused.value) == (
        "cannot list the images of ECR repository sd-lambda (ecr:DescribeImages): AccessDeniedException: "
        "not authorized to perform: ecr:DescribeImages; the deploying identity needs ecr:DescribeImages on "
        "the repository (in us-east-1)"
    )


def test_a_digest_the_listing_lacks_is_a_stack_error_not_stop_iteration() -> None:
    image = parse_pinned_image(f"{REPOSITORY_URL}@{DIGEST}")
    other = {"imageDigest": "sha256:" + "cd" * 32, "imagePushedAt": 1, "imageTags": ["deployed-x"]}

    with pytest.raises(StackError) as missing:
        deploy.refuse_an_image_the_lifecycle_would_expire([other], image, keep=3)

    assert str(missing.value) == (
        f"sd-lambda: image {DIGEST} is not in the repository's image list: push it again"
    )


def test_apply_uses_one_ecr_client_and_one_listing(aws: None) -> None:
    digest = push_image_to_moto()
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    made: list[str] = []
    listings: list[str] = []

    def clients(service: str, region: str) -> Any:
        made.append(service)
        client = boto3.client(service, region_name=region)
        client.meta.events.register(
            "before-call.ecr.DescribeImages", lambda **_: listings.append("DescribeImages")
        )
        return client

    deploy.apply(DeployOptions(image_uri=f"{REPOSITORY_URL}@{digest}", wait_seconds=10), FakeStack(), clients)

    assert made == ["ecr", "lambda"]
    assert listings == ["DescribeImages"]  # the manifest check and the lifecycle check read one listing


def test_an_unreadable_var_file_stops_apply_in_one_line_before_terraform(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tfvars"
    broken.write_text('ecr_keep_deployments = = "a"\n')
    stack = FakeStack()
    options = DeployOptions(infra_dir=INFRA, var_files=(broken,), image_uri=f"{REPOSITORY_URL}@{DIGEST}")

    with pytest.raises(StackError) as refused:
        deploy.apply(options, stack)

    assert str(refused.value).startswith(f"cannot parse {broken}: ")
    assert "\n" not in str(refused.value)
    assert stack.names == []  # nothing planned, nothing created


def test_cli_apply_reads_the_var_files_once(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import sd_lambda.ops.tfvars
    from sd_lambda.ops.preflight import Findings

    digest = push_image_to_moto()
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    reads: list[tuple[str, ...]] = []
    real = sd_lambda.ops.tfvars.effective_values

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        reads.append(tuple(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sd_lambda.ops.tfvars, "effective_values", counted)
    monkeypatch.setattr(deploy, "run_preflight", lambda inputs, clients, docker: Findings())
    monkeypatch.setattr(deploy, "_stack", lambda options: FakeStack())
    image_uri = f"{REPOSITORY_URL}@{digest}"

    code = cli_main(
        [
            "deploy",
            "apply",
            "--infra",
            str(INFRA),
            "--region",
            REGION,
            "--image-uri",
            image_uri,
            "--wait-seconds",
            "10",
        ]
    )

    assert code == 0
    assert reads == [deploy.STACK_VARIABLES]


def test_both_plan_refusals_share_one_walk_over_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    from sd_lambda.ops import plan_guard

    def one_walk(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        yield "replace", {"address": deploy.FUNCTION_ADDRESS, "type": "aws_ecr_repository"}

    monkeypatch.setattr(plan_guard, "removals", one_walk)
    empty: dict[str, Any] = {"resource_changes": []}  # only the shared walk can find anything in it

    with pytest.raises(StackError, match=r"^refusing a plan that would replace "):
        deploy.refuse_data_loss(empty, DeployOptions())
    with pytest.raises(StackError, match=r"^refusing to replace the live function "):
        deploy.refuse_function_deletion(empty, DeployOptions())
    deploy.refuse_data_loss(empty, DeployOptions(allow_data_loss=True))
    deploy.refuse_function_deletion(empty, DeployOptions(allow_function_delete=True))


def test_the_stack_protocol_has_no_unplanned_apply() -> None:
    # Every apply goes through a saved, checked plan (apply_plan); a plain apply would skip the checks.
    assert "apply" not in vars(deploy.Stack)
    assert "apply_plan" in vars(deploy.Stack)
