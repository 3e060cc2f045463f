"""weights_source = "efs" | "image" and vpc_enabled, from real Terraform plans made offline (tfcheck).

With "image" the model is baked into the function image (sd_lambda.ops.container.baked): the plan must
hold no file system, seeder, SSM endpoint or (unless vpc_enabled) VPC, and must leave the image's own
MODEL_ROOT/MODEL_NAME alone; with "efs" nothing changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_jobs_plan import assert_checkov_passes
from test_stack_plan import EXAMPLE_VARS, INFRA, KMS_KEY, ROOT_VARS, one, resources, statements, tfvars

from sd_lambda.devtools.tfcheck import PlanError, plan

pytestmark = pytest.mark.slow

BAKED = INFRA / "examples" / "baked"
EFS_TYPES = {
    "aws_efs_file_system",
    "aws_efs_mount_target",
    "aws_efs_access_point",
    "aws_efs_file_system_policy",
}
VPC_TYPES = {
    "aws_vpc",
    "aws_subnet",
    "aws_route_table",
    "aws_route_table_association",
    "aws_security_group",
    "aws_default_security_group",
    "aws_vpc_endpoint",
    "aws_vpc_security_group_ingress_rule",
    "aws_vpc_security_group_egress_rule",
    "aws_flow_log",
}
SEEDER_TYPES = {"aws_instance", "aws_iam_instance_profile"}


def _plan_root(variables: dict[str, Any]) -> dict[str, Any]:
    return plan(INFRA, variables, var_files=[ROOT_VARS])


@pytest.fixture(scope="module")
def efs_plan() -> dict[str, Any]:
    # A given key throughout: checkov cannot follow a key created in the same plan (unknown ARN).
    return _plan_root({"kms_key_arn": KMS_KEY})


@pytest.fixture(scope="module")
def image_plan() -> dict[str, Any]:
    # A given key: the role's policy document then renders at plan time.
    return _plan_root({"weights_source": "image", "kms_key_arn": KMS_KEY})


@pytest.fixture(scope="module")
def image_in_vpc_plan() -> dict[str, Any]:
    return _plan_root(
        {"weights_source": "image", "vpc_enabled": True, "jobs_enabled": True, "kms_key_arn": KMS_KEY}
    )


@pytest.fixture(scope="module")
def baked_plan() -> dict[str, Any]:
    return plan(BAKED, {}, var_files=[EXAMPLE_VARS / "baked.tfvars"])


def _types(document: dict[str, Any]) -> set[str]:
    return {r["type"] for r in resources(document)}


def _outputs(document: dict[str, Any]) -> dict[str, Any]:
    return {name: entry.get("value") for name, entry in document["planned_values"]["outputs"].items()}


def _function(document: dict[str, Any]) -> dict[str, Any]:
    return one(document, "aws_lambda_function")


def _role_statements(document: dict[str, Any]) -> set[str]:
    return set(statements(document, "module.lambda.data.aws_iam_policy_document.this"))


def test_efs_stays_the_default_with_the_mount_the_seeder_and_the_vpc(efs_plan: dict[str, Any]) -> None:
    types = _types(efs_plan)
    assert types >= EFS_TYPES
    assert types >= SEEDER_TYPES
    assert types >= {"aws_vpc", "aws_subnet", "aws_vpc_endpoint"}
    function = _function(efs_plan)
    assert function["file_system_config"][0]["local_mount_path"] == "/mnt/models"
    environment = function["environment"][0]["variables"]
    assert (environment["MODEL_ROOT"], environment["MODEL_NAME"]) == ("/mnt/models", "segmind--tiny-sd")
    assert function["vpc_config"]
    assert function["description"].endswith("from EFS")
    outputs = _outputs(efs_plan)
    assert outputs["weights_source"] == "efs"
    assert outputs["vpc_enabled"] is True
    assert outputs["model_root"] == "/mnt/models"
    assert outputs["model_name"] == "segmind--tiny-sd"


def test_image_mode_creates_no_file_system_seeder_or_network(image_plan: dict[str, Any]) -> None:
    types = _types(image_plan)
    assert not types & EFS_TYPES
    assert not types & SEEDER_TYPES
    assert not types & VPC_TYPES
    addresses = {r["address"] for r in resources(image_plan)}
    assert not [a for a in addresses if a.startswith(("module.efs", "module.network", "module.seeder"))]


def test_image_mode_function_runs_the_pinned_image_outside_a_vpc_without_overriding_its_model(
    image_plan: dict[str, Any],
) -> None:
    function = _function(image_plan)
    assert function["package_type"] == "Image"
    assert function["image_uri"] == tfvars(ROOT_VARS)["image_uri"]
    assert function["file_system_config"] == []
    assert function["vpc_config"] == []
    environment = function["environment"][0]["variables"]
    # The image's ENV names the release baked into it (MODEL_ROOT=/opt/models, MODEL_NAME=<name>).
    assert "MODEL_ROOT" not in environment
    assert "MODEL_NAME" not in environment
    assert environment == {"SD_MAX_STEPS": "25", "SD_THREADS": "6"}


def test_image_mode_role_has_no_efs_or_vpc_permissions(image_plan: dict[str, Any]) -> None:
    assert _role_statements(image_plan) == {"WriteOwnLogs", "DecryptEnvironment"}
    attached = {r["values"]["policy_arn"] for r in resources(image_plan, "aws_iam_role_policy_attachment")}
    assert not [arn for arn in attached if arn.endswith("AWSLambdaENIManagementAccess")]


def test_efs_mode_role_keeps_its_vpc_permissions(efs_plan: dict[str, Any]) -> None:
    # Its EFS statement: test_stack_plan.py, test_function_role_writes_only_its_log_group_...
    attached = {r["values"]["policy_arn"] for r in resources(efs_plan, "aws_iam_role_policy_attachment")}
    assert [arn for arn in attached if arn.endswith("AWSLambdaENIManagementAccess")]


def test_image_mode_outputs_of_what_does_not_exist_are_null(image_plan: dict[str, Any]) -> None:
    outputs = _outputs(image_plan)
    assert outputs["weights_source"] == "image"
    assert outputs["vpc_enabled"] is False
    for name in (
        "model_name",
        "model_root",
        "efs_file_system_id",
        "efs_file_system_arn",
        "efs_access_point_id",
        "efs_access_point_arn",
        "seeder_instance_id",
        "seeder_role_arn",
        "seeder_mount_path",
        "vpc_id",
        "private_subnet_ids",
        "function_security_group_id",
        "efs_security_group_id",
        "seeder_security_group_id",
        "lambda_endpoint_id",
    ):
        assert name in image_plan["planned_values"]["outputs"], name  # known at plan time: null
        assert name not in _unknown_outputs(image_plan), name
        assert outputs.get(name) is None, name


def _unknown_outputs(document: dict[str, Any]) -> set[str]:
    return {
        name for name, unknown in document.get("output_changes", {}).items() if unknown.get("after_unknown")
    }


def test_image_mode_in_a_vpc_keeps_only_the_function_and_jobs_network(
    image_in_vpc_plan: dict[str, Any],
) -> None:
    types = _types(image_in_vpc_plan)
    assert not types & EFS_TYPES
    assert not types & SEEDER_TYPES
    groups = {g["values"]["description"] for g in resources(image_in_vpc_plan, "aws_security_group")}
    assert groups == {
        # The EFS mode's wording: one description in every mode, so a switch never replaces the group.
        "sd-lambda function ENIs: NFS to EFS only",
        "Lambda API interface endpoint: HTTPS from the function only (it starts its own jobs)",
    }
    endpoints = {
        r["values"]["service_name"].rsplit(".", 1)[-1]
        for r in resources(image_in_vpc_plan, "aws_vpc_endpoint")
    }
    assert endpoints == {"s3", "lambda"}  # no ssm, ssmmessages, ec2messages
    ports = {
        r["values"]["from_port"] for r in resources(image_in_vpc_plan, "aws_vpc_security_group_egress_rule")
    }
    assert ports == {443}  # no NFS
    function = _function(image_in_vpc_plan)
    assert function["vpc_config"]
    assert function["file_system_config"] == []


def test_baked_example_consumes_the_module_in_image_mode_with_jobs_over_public_endpoints(
    baked_plan: dict[str, Any],
) -> None:
    calls = baked_plan["configuration"]["root_module"]["module_calls"]
    assert calls["sd_lambda"]["source"] == "../.."
    types = _types(baked_plan)
    assert not types & (EFS_TYPES | SEEDER_TYPES | VPC_TYPES)
    function = _function(baked_plan)
    assert function["image_uri"].endswith(
        "@sha256:7e1d2c3b4a5968778695a4b3c2d1e0f9e8d7c6b5a4938271605f4e3d2c1b0a9f"
    )
    environment = function["environment"][0]["variables"]
    assert "MODEL_ROOT" not in environment
    # Empty: the handler starts jobs through Lambda's public regional endpoint, no interface endpoint.
    assert environment["SD_JOBS_LAMBDA_ENDPOINT"] == ""
    assert resources(baked_plan, "aws_lambda_function_event_invoke_config")
    assert _outputs(baked_plan)["weights_source"] == "image"


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"weights_source": "s3"}, 'weights_source must be "efs" or "image"'),
        ({"vpc_enabled": False}, "needs vpc_enabled = true"),
        (
            {
                "weights_source": "image",
                "vpc_id": "vpc-0a1b2c3d4e5f60718",
                "private_subnet_ids": ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002"],
            },
            "runs outside a VPC",
        ),
    ],
)
def test_mode_mistakes_are_refused_with_one_clear_message(variables: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError) as refused:
        _plan_root(variables)
    assert message in " ".join(str(refused.value).split())


def test_baked_example_refuses_efs() -> None:
    with pytest.raises(PlanError) as refused:
        plan(BAKED, {"weights_source": "efs"}, var_files=[EXAMPLE_VARS / "baked.tfvars"])
    assert "weights_source must be" in " ".join(str(refused.value).split())


# The baked example's own key is created in its plan (unknown to checkov): `make security` scans its source.
@pytest.mark.parametrize("state", ["efs_plan", "image_plan", "image_in_vpc_plan"])
def test_checkov_passes_both_weights_sources(
    state: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """checkov over the planned values (its terraform_plan framework) of each mode."""
    assert_checkov_passes(request.getfixturevalue(state), tmp_path / f"{state}.json")
