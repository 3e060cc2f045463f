"""Plan-level guarantees of infra/ and its examples, from real Terraform plans made offline (tfcheck).

Each plan is the `terraform show -json` document of the real Terraform core planning against the aws
provider 6.47.0 schema; the assertions read what Terraform would send to AWS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions

from sd_lambda.tfcheck import PlanError, plan
from sd_lambda.tfcheck.schema import load_schema

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
HERE = Path(__file__).parent
ROOT_VARS = HERE / "offline.tfvars"
EXAMPLE_VARS = HERE / "examples"
WORLD_OPEN = {"0.0.0.0/0", "::/0"}
CONTRACT_OUTPUTS = {
    "function_url",
    "function_name",
    "ecr_repository_url",
    "weights_bucket",
    "weights_prefix",
    "seeder_instance_id",
    "seeder_mount_path",
    "efs_id",
    "access_point_arn",
    "invoker_policy_json",
    "region",
    "model_name",
}


def tfvars(path: Path) -> dict[str, Any]:
    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
    with path.open() as handle:
        return hcl2.load(handle, serialization_options=options)


def resources(document: dict[str, Any], type_name: str | None = None) -> list[dict[str, Any]]:
    """Managed resources of the planned state, through every module level."""

    def walk(module: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from module.get("resources", [])
        for child in module.get("child_modules", []):
            yield from walk(child)

    return [
        r
        for r in walk(document["planned_values"]["root_module"])
        if r["mode"] == "managed" and (type_name is None or r["type"] == type_name)
    ]


def one(document: dict[str, Any], type_name: str) -> dict[str, Any]:
    found = resources(document, type_name)
    assert len(found) == 1, f"expected one {type_name}, found {[r['address'] for r in found]}"
    return found[0]["values"]


@pytest.fixture(scope="module")
def root_plan() -> dict[str, Any]:
    return plan(INFRA, {}, var_files=[ROOT_VARS])


@pytest.fixture(scope="module")
def root_defaults_plan() -> dict[str, Any]:
    return plan(INFRA, {})


@pytest.fixture(scope="module")
def lean_plan() -> dict[str, Any]:
    """Existing bucket, no seeder, no SSM endpoints, no flow logs."""
    return plan(
        INFRA,
        {
            "create_seeder": False,
            "create_weights_bucket": False,
            "weights_bucket_name": "acme-weights",
            "create_ssm_endpoints": False,
            "enable_flow_logs": False,
            "image_uri": tfvars(ROOT_VARS)["image_uri"],
        },
    )


@pytest.fixture(scope="module")
def complete_plan() -> dict[str, Any]:
    return plan(INFRA / "examples" / "complete", {}, var_files=[EXAMPLE_VARS / "complete.tfvars"])


@pytest.fixture(scope="module")
def existing_vpc_plan() -> dict[str, Any]:
    return plan(INFRA / "examples" / "existing-vpc", {}, var_files=[EXAMPLE_VARS / "existing-vpc.tfvars"])


ALL_PLANS = ["root_plan", "root_defaults_plan", "lean_plan", "complete_plan", "existing_vpc_plan"]
PLANS_WITH_FUNCTION = ["root_plan", "lean_plan", "complete_plan", "existing_vpc_plan"]


@pytest.fixture(params=ALL_PLANS)
def any_plan(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=PLANS_WITH_FUNCTION)
def function_plan(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.getfixturevalue(request.param)


################################################################################
# Security properties, every plan
################################################################################


def _covers(rule: dict[str, Any], port: int) -> bool:
    if rule.get("ip_protocol") in ("-1", "all"):
        return True
    return (rule.get("from_port") or 0) <= port <= (rule.get("to_port") or 65535)


def test_no_security_group_rule_opens_ssh_or_nfs_to_the_world(any_plan: dict[str, Any]) -> None:
    rules = resources(any_plan, "aws_vpc_security_group_ingress_rule") + resources(
        any_plan, "aws_vpc_security_group_egress_rule"
    )
    assert rules, "the plan has no security group rules at all"
    for rule in rules:
        values = rule["values"]
        sources = {values.get("cidr_ipv4"), values.get("cidr_ipv6")} & WORLD_OPEN
        for port in (22, 2049):
            assert not (sources and _covers(values, port)), f"{rule['address']} opens {port} to {sources}"
    for group in resources(any_plan, "aws_security_group") + resources(
        any_plan, "aws_default_security_group"
    ):
        assert not group["values"].get("ingress"), f"{group['address']} has inline ingress rules"
    assert not resources(any_plan, "aws_security_group_rule")


def test_nothing_is_reachable_from_the_internet(any_plan: dict[str, Any]) -> None:
    for rule in resources(any_plan, "aws_vpc_security_group_ingress_rule"):
        values = rule["values"]
        assert values.get("cidr_ipv4") not in WORLD_OPEN
        assert values.get("cidr_ipv6") not in WORLD_OPEN
    assert not resources(any_plan, "aws_internet_gateway")
    assert not resources(any_plan, "aws_nat_gateway")


def test_nfs_reaches_efs_only_from_the_function_and_seeder_groups(any_plan: dict[str, Any]) -> None:
    nfs = [
        r["values"]
        for r in resources(any_plan, "aws_vpc_security_group_ingress_rule")
        if _covers(r["values"], 2049)
    ]
    assert len(nfs) == 2
    for values in nfs:
        assert (values["from_port"], values["to_port"], values["ip_protocol"]) == (2049, 2049, "tcp")
        # group references only
        assert values.get("cidr_ipv4") is None
        assert values.get("cidr_ipv6") is None


def test_efs_is_encrypted_elastic_and_served_through_a_models_access_point(any_plan: dict[str, Any]) -> None:
    file_system = one(any_plan, "aws_efs_file_system")
    assert file_system["encrypted"] is True
    assert file_system["throughput_mode"] == "elastic"
    assert file_system["performance_mode"] == "generalPurpose"

    access_point = one(any_plan, "aws_efs_access_point")
    root = access_point["root_directory"][0]
    assert root["path"] == "/models" != "/"
    assert root["creation_info"] == [{"owner_uid": 1000, "owner_gid": 1000, "permissions": "0755"}]
    assert access_point["posix_user"][0]["uid"] == 1000
    assert access_point["posix_user"][0]["gid"] == 1000
    assert len(resources(any_plan, "aws_efs_mount_target")) >= 2
    assert resources(any_plan, "aws_efs_file_system_policy")


def test_ecr_is_immutable_scanned_and_kms_encrypted(any_plan: dict[str, Any]) -> None:
    repository = one(any_plan, "aws_ecr_repository")
    assert repository["image_tag_mutability"] == "IMMUTABLE"
    assert repository["image_scanning_configuration"] == [{"scan_on_push": True}]
    assert repository["encryption_configuration"][0]["encryption_type"] == "KMS"
    rules = json.loads(one(any_plan, "aws_ecr_lifecycle_policy")["policy"])["rules"]
    assert rules[0]["selection"]["countType"] == "imageCountMoreThan"


def test_every_taggable_resource_carries_the_stack_tags(any_plan: dict[str, Any]) -> None:
    schema = load_schema()
    stack_tags = {
        key: value for key, value in any_plan["variables"].get("tags", {}).get("value", {}).items()
    } or {"sd-lambda:stack": "sd-lambda"}
    checked = 0
    for resource in resources(any_plan):
        taggable = "tags" in schema.resource_block(resource["type"]).get("attributes", {})
        if not taggable:
            continue
        tags = resource["values"].get("tags") or {}
        missing = {k: v for k, v in stack_tags.items() if tags.get(k) != v}
        assert not missing, f"{resource['address']} lacks stack tags {missing}"
        checked += 1
    for instance in resources(any_plan, "aws_instance"):
        volume_tags = instance["values"]["root_block_device"][0]["tags"]
        assert stack_tags.items() <= volume_tags.items()
    assert checked >= 10


def test_function_url_is_iam_only(function_plan: dict[str, Any]) -> None:
    assert one(function_plan, "aws_lambda_function_url")["authorization_type"] == "AWS_IAM"


def test_function_runs_the_pinned_image_with_the_model_mounted(function_plan: dict[str, Any]) -> None:
    function = one(function_plan, "aws_lambda_function")
    assert function["package_type"] == "Image"
    assert "@sha256:" in function["image_uri"]
    assert function["file_system_config"][0]["local_mount_path"] == "/mnt/models"
    environment = function["environment"][0]["variables"]
    assert environment["MODEL_ROOT"] == "/mnt/models"
    assert environment["MODEL_NAME"] == "segmind--tiny-sd"
    assert function["logging_config"][0]["log_format"] == "JSON"
    assert function["replace_security_groups_on_destroy"] is True
    assert function["reserved_concurrent_executions"] >= 1
    assert function["vpc_config"]


def test_seeder_requires_imdsv2_and_is_private(any_plan: dict[str, Any]) -> None:
    instances = resources(any_plan, "aws_instance")
    if any_plan["variables"].get("create_seeder", {}).get("value") is False:
        assert instances == []
        return
    instance = one(any_plan, "aws_instance")
    assert instance["metadata_options"][0]["http_tokens"] == "required"
    assert instance["associate_public_ip_address"] is False
    assert instance["root_block_device"][0]["encrypted"] is True
    change = next(c["change"] for c in any_plan["resource_changes"] if c["type"] == "aws_instance")
    # Unset in the configuration, so left for AWS to fill: no key pair (a configured one would be known).
    assert change["after_unknown"].get("key_name") is True
    assert "key_name" not in change["after"]


def test_no_instance_state_resource_fights_the_seeding_driver(any_plan: dict[str, Any]) -> None:
    assert resources(any_plan, "aws_ec2_instance_state") == []


################################################################################
# Configured values, per plan
################################################################################


def test_root_stack_uses_the_configured_values(root_plan: dict[str, Any]) -> None:
    configured = tfvars(ROOT_VARS)
    function = one(root_plan, "aws_lambda_function")
    assert function["function_name"] == configured["name"]
    assert function["memory_size"] == configured["memory_size"]
    assert function["timeout"] == configured["timeout"]
    assert function["reserved_concurrent_executions"] == configured["reserved_concurrency"]
    assert function["image_uri"] == configured["image_uri"]
    assert function["region"] == configured["region"]
    environment = function["environment"][0]["variables"]
    assert configured["environment_variables"].items() <= environment.items()

    ssh = [
        r["values"]
        for r in resources(root_plan, "aws_vpc_security_group_ingress_rule")
        if _covers(r["values"], 22)
    ]
    assert [(r["cidr_ipv4"], r["from_port"], r["to_port"]) for r in ssh] == [("203.0.113.0/24", 22, 22)]

    alarms = {
        r["values"]["metric_name"]: r["values"] for r in resources(root_plan, "aws_cloudwatch_metric_alarm")
    }
    assert set(alarms) == {"Errors", "Throttles", "Duration"}
    assert alarms["Duration"]["threshold"] == configured["timeout"] * 1000 * 0.8
    assert all(a["alarm_actions"] == [configured["alarm_sns_topic_arn"]] for a in alarms.values())


def test_root_outputs_keep_the_contract(root_plan: dict[str, Any]) -> None:
    outputs = root_plan["planned_values"]["outputs"]
    assert set(outputs) >= CONTRACT_OUTPUTS
    assert outputs["weights_prefix"]["value"] == "models/"
    assert outputs["seeder_mount_path"]["value"] == "/mnt/models"
    assert outputs["model_name"]["value"] == "segmind--tiny-sd"
    assert outputs["region"]["value"] == "eu-west-1"


def test_defaults_give_a_private_two_zone_vpc_and_no_function_until_an_image_exists(
    root_defaults_plan: dict[str, Any],
) -> None:
    assert resources(root_defaults_plan, "aws_lambda_function") == []
    assert resources(root_defaults_plan, "aws_lambda_function_url") == []
    assert resources(root_defaults_plan, "aws_ecr_repository")
    subnets = [r["values"] for r in resources(root_defaults_plan, "aws_subnet")]
    assert len({s["availability_zone"] for s in subnets}) == 2
    assert all(s["map_public_ip_on_launch"] is False for s in subnets)
    assert not [
        r
        for r in resources(root_defaults_plan, "aws_vpc_security_group_ingress_rule")
        if _covers(r["values"], 22)
    ]
    endpoints = {
        r["values"]["service_name"].rsplit(".", 1)[-1]
        for r in resources(root_defaults_plan, "aws_vpc_endpoint")
    }
    assert endpoints == {"s3", "ssm", "ssmmessages", "ec2messages"}
    assert one(root_defaults_plan, "aws_kms_key")["enable_key_rotation"] is True


def test_lean_variant_uses_the_existing_bucket_and_creates_no_seeder(lean_plan: dict[str, Any]) -> None:
    assert resources(lean_plan, "aws_s3_bucket") == []
    assert resources(lean_plan, "aws_instance") == []
    assert resources(lean_plan, "aws_flow_log") == []
    assert {r["values"]["vpc_endpoint_type"] for r in resources(lean_plan, "aws_vpc_endpoint")} == {"Gateway"}
    assert lean_plan["planned_values"]["outputs"]["weights_bucket"]["value"] == "acme-weights"


def test_examples_consume_the_root_as_a_module(
    complete_plan: dict[str, Any], existing_vpc_plan: dict[str, Any]
) -> None:
    for document in (complete_plan, existing_vpc_plan):
        calls = document["configuration"]["root_module"]["module_calls"]
        assert calls["sd_lambda"]["source"] == "../.."


def test_existing_vpc_example_adds_only_its_own_network_pieces(existing_vpc_plan: dict[str, Any]) -> None:
    configured = tfvars(EXAMPLE_VARS / "existing-vpc.tfvars")
    assert resources(existing_vpc_plan, "aws_vpc") == []
    assert resources(existing_vpc_plan, "aws_subnet") == []
    assert resources(existing_vpc_plan, "aws_route_table") == []
    assert {g["values"]["vpc_id"] for g in resources(existing_vpc_plan, "aws_security_group")} == {
        configured["vpc_id"]
    }
    gateway = [
        r["values"]
        for r in resources(existing_vpc_plan, "aws_vpc_endpoint")
        if r["values"]["vpc_endpoint_type"] == "Gateway"
    ]
    assert gateway[0]["route_table_ids"] == configured["private_route_table_ids"]
    targets = [r["values"]["subnet_id"] for r in resources(existing_vpc_plan, "aws_efs_mount_target")]
    assert targets == configured["private_subnet_ids"]
    assert one(existing_vpc_plan, "aws_instance")["subnet_id"] == configured["private_subnet_ids"][0]
    assert resources(existing_vpc_plan, "aws_s3_bucket") == []  # reads the existing weights bucket
    assert one(existing_vpc_plan, "aws_lambda_function")["memory_size"] == 3008


def test_complete_example_wires_alarms_to_its_topic(complete_plan: dict[str, Any]) -> None:
    assert one(complete_plan, "aws_sns_topic")["kms_master_key_id"] == "alias/aws/sns"
    assert len(resources(complete_plan, "aws_cloudwatch_metric_alarm")) == 3
    tags = tfvars(INFRA / "examples" / "complete" / "variables.tf")
    assert tags  # the example's variables parse; its default tags are checked by the tag test


################################################################################
# Validations reject bad input before anything is planned
################################################################################

DIGEST_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sd-lambda@sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/sd-lambda:latest"}, "pinned by digest"),
        ({"image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/sd-lambda:v1.2"}, "pinned by digest"),
        ({"image_uri": "public.ecr.aws/lambda/python@sha256:" + "a" * 64}, "pinned by digest"),
        ({"ssh_ingress_cidrs": ["0.0.0.0/0"]}, "0.0.0.0/0 and ::/0 are rejected"),
        ({"ssh_ingress_cidrs": ["10.0.0.0/8", "::/0"]}, "0.0.0.0/0 and ::/0 are rejected"),
        ({"memory_size": 64, "image_uri": DIGEST_URI}, "between 128 and 10240"),
        ({"memory_size": 10241}, "between 128 and 10240"),
        ({"timeout": 901}, "between 1 and 900"),
        ({"environment_variables": {"MODEL_ROOT": "/tmp"}}, "not MODEL_ROOT or MODEL_NAME"),
        ({"model_name": "../etc"}, "model_name must be a slug"),
        ({"name": "a-very-long-stack-name-x25"}, "name must be 2-24 characters"),
        (
            {"vpc_id": "vpc-0a1b2c3d4e5f60718", "private_subnet_ids": ["subnet-0a1b2c3d4e5f60001"]},
            "at least two",
        ),
    ],
    ids=[
        "latest-tag",
        "version-tag",
        "not-ecr",
        "ssh-world-v4",
        "ssh-world-v6",
        "memory-low",
        "memory-high",
        "timeout",
        "env-overrides-contract",
        "model-path",
        "name-too-long",
        "one-subnet",
    ],
)
def test_validations_reject_bad_input(variables: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError) as caught:
        plan(INFRA, variables)
    errors = " ".join(f"{d.summary} {d.detail}" for d in caught.value.diagnostics if d.severity == "error")
    assert message in " ".join(errors.split())
