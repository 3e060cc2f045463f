"""Plan-level guarantees of infra/ and its examples, from real Terraform plans made offline (tfcheck).

Each plan is the `terraform show -json` document of the real Terraform core planning against the aws
provider 6.47.0 schema; the assertions read what Terraform would send to AWS.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions

from sd_lambda.devtools.tfcheck import PlanError, plan
from sd_lambda.devtools.tfcheck.schema import load_schema
from sd_lambda.ops.deploy import FUNCTION_ADDRESS, REGISTRY_TARGETS

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
    "weights_bucket_name",
    "weights_prefix",
    "seeder_instance_id",
    "seeder_mount_path",
    "efs_file_system_id",
    "efs_access_point_arn",
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


KMS_KEY = "arn:aws:kms:eu-west-1:123456789012:key/11111111-2222-3333-4444-555555555555"
INVOKERS = ["arn:aws:iam::123456789012:role/image-client", "210987654321"]
ROLE_PATH = "/sd-lambda/"
BOUNDARY = "arn:aws:iam::123456789012:policy/workload-boundary"
WEIGHTS_KEY = "arn:aws:kms:eu-west-1:123456789012:key/66666666-2222-3333-4444-555555555555"


@pytest.fixture(scope="module")
def known_arns_plan() -> dict[str, Any]:
    """Only the image set, plus a given key and an existing bucket: the IAM documents render at plan time."""
    return plan(
        INFRA,
        {
            "name": "sd-iam",
            "region": "eu-west-1",
            "kms_key_arn": KMS_KEY,
            "create_weights_bucket": False,
            "weights_bucket_name": "acme-weights",
            "weights_bucket_kms_key_arn": WEIGHTS_KEY,
            "image_uri": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd-iam@sha256:" + "a" * 64,
            "invoker_principals": INVOKERS,
            "iam_role_path": ROLE_PATH,
            "iam_role_permissions_boundary_arn": BOUNDARY,
            "tracing_mode": "PassThrough",
            "application_log_level": "WARN",
            "seeder_root_volume_size": 40,
            "availability_zones": ["eu-west-1b", "eu-west-1c"],
        },
    )


@pytest.fixture(scope="module")
def complete_plan() -> dict[str, Any]:
    return plan(INFRA / "examples" / "complete", {}, var_files=[EXAMPLE_VARS / "complete.tfvars"])


# What the existing VPC's data sources answer: DNS on, as the stack requires (see the precondition tests).
EXISTING_VPC_DATA = {"aws_vpc": {"enable_dns_support": True, "enable_dns_hostnames": True}}
EXISTING_VPC = INFRA / "examples" / "existing-vpc"


def plan_existing_vpc(variables: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    return plan(
        EXISTING_VPC,
        variables,
        {**EXISTING_VPC_DATA, **(data or {})},
        var_files=[EXAMPLE_VARS / "existing-vpc.tfvars"],
    )


@pytest.fixture(scope="module")
def existing_vpc_plan() -> dict[str, Any]:
    return plan_existing_vpc({})


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
    reserved = function["reserved_concurrent_executions"]
    assert reserved == -1 or reserved >= 1  # -1: no reservation
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
    assert lean_plan["planned_values"]["outputs"]["weights_bucket_name"]["value"] == "acme-weights"


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
    # No S3 gateway endpoint unless asked for: it would reroute every S3 call of the caller's subnets.
    assert "Gateway" not in {
        r["values"]["vpc_endpoint_type"] for r in resources(existing_vpc_plan, "aws_vpc_endpoint")
    }
    targets = [r["values"]["subnet_id"] for r in resources(existing_vpc_plan, "aws_efs_mount_target")]
    assert targets == configured["private_subnet_ids"]
    assert one(existing_vpc_plan, "aws_instance")["subnet_id"] == configured["private_subnet_ids"][0]
    assert resources(existing_vpc_plan, "aws_s3_bucket") == []  # reads the existing weights bucket
    assert one(existing_vpc_plan, "aws_lambda_function")["memory_size"] == 3008


def test_complete_example_wires_alarms_to_its_topic(complete_plan: dict[str, Any]) -> None:
    # The stack's key, whose policy lets CloudWatch publish (alias/aws/sns cannot: alarms never arrive).
    topic = next(
        r for r in complete_plan["configuration"]["root_module"]["resources"] if r["type"] == "aws_sns_topic"
    )
    assert topic["expressions"]["kms_master_key_id"]["references"][0] == "module.sd_lambda.kms_key_arn"
    statements = {s["Sid"]: s for s in json.loads(one(complete_plan, "aws_kms_key")["policy"])["Statement"]}
    alarms = statements["CloudWatchAlarmsToEncryptedTopics"]
    assert alarms["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    assert set(alarms["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
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
        ({"reserved_concurrency": 0, "image_uri": DIGEST_URI}, "null (no reservation) or a whole number"),
        ({"iam_role_path": "sd-lambda"}, "role_path must start and end with /"),
        (
            {"invoker_principals": ["*"]},
            "invoker_principals must be 12-digit account ids or IAM role/user ARNs",
        ),
        ({"environment_variables": {"MODEL_ROOT": "/tmp"}}, "not MODEL_ROOT or MODEL_NAME"),
        ({"model_name": "../etc"}, "model_name must be a slug"),
        ({"name": "a-very-long-stack-name-x25"}, "name must be 2-24 characters"),
        (
            {"vpc_id": "vpc-0a1b2c3d4e5f60718", "private_subnet_ids": ["subnet-0a1b2c3d4e5f60001"]},
            "at least two",
        ),
        ({"create_weights_bucket": False}, "bucket_name (root stack: weights_bucket_name) must name"),
        ({"create_ssm_endpoints": False}, "with create_ssm_endpoints = false, set seeder_https_egress_cidrs"),
        ({"seeder_instance_type": "t4g.small"}, "t4g.small runs arm64 but its AMI architecture is x86_64"),
        (
            {"seeder_instance_type": "t3.small", "seeder_architecture": "arm64"},
            "t3.small runs x86_64 but its AMI architecture is arm64",
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
        "reserved-zero",
        "role-path",
        "invoker-wildcard",
        "env-overrides-contract",
        "model-path",
        "name-too-long",
        "one-subnet",
        "existing-bucket-without-name",
        "seeder-unreachable-without-ssm-endpoints",
        "graviton-type-x86-ami",
        "x86-type-arm-ami",
    ],
)
def test_validations_reject_bad_input(variables: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError) as caught:
        plan(INFRA, variables)
    errors = " ".join(f"{d.summary} {d.detail}" for d in caught.value.diagnostics if d.severity == "error")
    assert message in " ".join(errors.split())


# Wide or non-canonical ranges that slipped through a "not 0.0.0.0/0" check: together or alone they open
# the port to (nearly) the whole internet.
BYPASS_CIDRS = [
    ["10.0.0.0/0"],
    ["0.0.0.0/1", "128.0.0.0/1"],
    ["10.1.2.3/8"],
    ["2001:db8::/8"],
    ["::/1", "8000::/1"],
    ["203.0.113.0"],
    ["not-a-cidr"],
]
CIDR_ENTRY_POINTS = {
    "root": (INFRA, {}),
    "network-module": (INFRA / "modules" / "network", {"name": "sd-net"}),
}


@pytest.mark.parametrize("entry", sorted(CIDR_ENTRY_POINTS))
@pytest.mark.parametrize("cidrs", BYPASS_CIDRS, ids=lambda c: ",".join(c))
def test_wide_or_malformed_cidrs_are_rejected_at_both_entry_points(entry: str, cidrs: list[str]) -> None:
    directory, base = CIDR_ENTRY_POINTS[entry]

    with pytest.raises(PlanError) as caught:
        plan(directory, {**base, "ssh_ingress_cidrs": cidrs, "seeder_https_egress_cidrs": cidrs})

    # Each variable is validated on its own: both must report.
    errors = " ".join(f"{d.summary} {d.detail}" for d in caught.value.diagnostics if d.severity == "error")
    for variable in ("ssh_ingress_cidrs", "seeder_https_egress_cidrs"):
        assert f"{variable} must be canonical CIDR blocks" in " ".join(errors.split())


def test_root_passes_cidrs_through_to_the_one_validation_in_the_network_module() -> None:
    """Item 16: validated once, where the value is used; the root's copies had drifted before."""

    def validated(directory: Path) -> set[str]:
        found = set()
        for block in tfvars(directory / "variables.tf")["variable"]:
            for name, body in block.items():
                if (
                    name.strip('"') in ("ssh_ingress_cidrs", "seeder_https_egress_cidrs")
                    and "validation" in body
                ):
                    found.add(name.strip('"'))
        return found

    assert validated(INFRA) == set()
    assert validated(INFRA / "modules" / "network") == {"ssh_ingress_cidrs", "seeder_https_egress_cidrs"}


def test_specific_ipv4_and_ipv6_cidrs_become_rules_of_the_right_family() -> None:
    document = plan(
        INFRA / "modules" / "network",
        {
            "name": "sd-net",
            "ssh_ingress_cidrs": ["203.0.113.0/24", "2001:db8:1234::/48"],
            "seeder_https_egress_cidrs": ["10.0.0.0/8"],
        },
    )

    ssh = {
        (r["values"]["cidr_ipv4"], r["values"]["cidr_ipv6"])
        for r in resources(document, "aws_vpc_security_group_ingress_rule")
        if r["values"]["from_port"] == 22
    }
    assert ssh == {("203.0.113.0/24", None), (None, "2001:db8:1234::/48")}
    https = [
        r["values"]
        for r in resources(document, "aws_vpc_security_group_egress_rule")
        if r["values"].get("cidr_ipv4")
    ]
    assert [(h["cidr_ipv4"], h["from_port"], h["to_port"]) for h in https] == [("10.0.0.0/8", 443, 443)]


def test_existing_vpc_without_new_ssm_endpoints_reaches_the_given_cidrs(tmp_path: Path) -> None:
    document = plan_existing_vpc(
        {"create_ssm_endpoints": False, "seeder_https_egress_cidrs": ["10.20.0.0/16"]}
    )

    assert resources(document, "aws_vpc_endpoint") == []
    egress = [r["values"] for r in resources(document, "aws_vpc_security_group_egress_rule")]
    assert [(e["cidr_ipv4"], e["from_port"]) for e in egress if e.get("cidr_ipv4")] == [("10.20.0.0/16", 443)]
    assert resources(document, "aws_instance")


def test_existing_vpc_example_without_ssm_endpoints_or_cidrs_is_refused() -> None:
    with pytest.raises(PlanError) as caught:
        plan_existing_vpc({"create_ssm_endpoints": False})
    assert "set seeder_https_egress_cidrs" in " ".join(d.detail for d in caught.value.diagnostics)


def test_weights_bucket_module_refuses_create_false_without_a_name() -> None:
    with pytest.raises(PlanError) as caught:
        plan(INFRA / "modules" / "weights_bucket", {"create": False})

    errors = [d for d in caught.value.diagnostics if d.severity == "error"]
    assert len(errors) == 1, [e.detail for e in errors]  # the precondition, not an interpolation error
    assert "bucket_name (root stack: weights_bucket_name) must name the existing bucket" in errors[0].detail


################################################################################
# IAM, encryption and network wiring, statement by statement
################################################################################


def data_values(document: dict[str, Any], address: str) -> dict[str, Any]:
    """A data source's values: read at plan time (prior_state) or deferred to apply (the planned read)."""

    def walk(module: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from module.get("resources", [])
        for child in module.get("child_modules", []):
            yield from walk(child)

    for resource in walk(document.get("prior_state", {}).get("values", {}).get("root_module", {})):
        if resource["address"] == address:
            return resource["values"]
    return next(c["change"]["after"] for c in document["resource_changes"] if c["address"] == address)


def statements(document: dict[str, Any], address: str) -> dict[str, dict[str, Any]]:
    """The ``statement`` blocks of an aws_iam_policy_document by sid; unknown values are None."""
    result = {}
    for statement in data_values(document, address)["statement"]:
        result[statement["sid"]] = {
            "effect": statement.get("effect") or "Allow",
            "actions": set(statement["actions"] or []),
            "resources": statement["resources"],
            "principals": {p["type"]: p["identifiers"] for p in statement.get("principals") or []},
            "conditions": {c["variable"]: (c["test"], c["values"]) for c in statement.get("condition") or []},
        }
    return result


def module_config(document: dict[str, Any], name: str) -> dict[str, Any]:
    return document["configuration"]["root_module"]["module_calls"][name]


def config_resource(module: dict[str, Any], address: str) -> dict[str, Any]:
    return next(r for r in module["module"]["resources"] if r["address"] == address)


def references(expression: dict[str, Any]) -> list[str]:
    return expression.get("references", [])


def test_function_role_writes_only_its_log_group_and_decrypts_only_its_environment(
    known_arns_plan: dict[str, Any],
) -> None:
    policy = statements(known_arns_plan, "module.lambda.data.aws_iam_policy_document.this")
    assert set(policy) == {
        "DescribeSubnetsForVpcAttachment",
        "WriteOwnLogs",
        "ReadModelsThroughAccessPoint",
        "DecryptEnvironment",
    }
    # Item 15: the Lambda VPC guide's execution-role list has it; AWSLambdaENIManagementAccess does not.
    assert policy["DescribeSubnetsForVpcAttachment"]["actions"] == {"ec2:DescribeSubnets"}
    assert policy["WriteOwnLogs"]["actions"] == {"logs:CreateLogStream", "logs:PutLogEvents"}
    assert policy["WriteOwnLogs"]["resources"] == [
        "arn:aws:logs:eu-west-1:123456789012:log-group:/aws/lambda/sd-iam:*"
    ]
    assert policy["ReadModelsThroughAccessPoint"]["actions"] == {"elasticfilesystem:ClientMount"}
    assert set(policy["ReadModelsThroughAccessPoint"]["conditions"]) == {"elasticfilesystem:AccessPointArn"}
    decrypt = policy["DecryptEnvironment"]
    assert (decrypt["actions"], decrypt["resources"]) == ({"kms:Decrypt"}, [KMS_KEY])
    assert decrypt["conditions"] == {
        "kms:EncryptionContext:aws:lambda:FunctionArn": (
            "StringEquals",
            ["arn:aws:lambda:eu-west-1:123456789012:function:sd-iam"],
        )
    }
    attached = {
        r["values"]["policy_arn"] for r in resources(known_arns_plan, "aws_iam_role_policy_attachment")
    }
    assert "arn:aws:iam::aws:policy/service-role/AWSLambdaENIManagementAccess" in attached
    assert not [
        arn for arn in attached if "AWSLambdaVPCAccessExecutionRole" in arn or "BasicExecution" in arn
    ]
    # The mount statement is a dynamic block (EFS mode only), which the plan's configuration omits: read
    # the module's source for what it references.
    mount = next(
        block["statement"]["content"][0]
        for block in _lambda_role_document_source().get("dynamic", [])
        if block["statement"]["content"][0]["sid"] == "ReadModelsThroughAccessPoint"
    )
    assert mount["resources"] == ["${var.file_system_arn}"]
    assert mount["condition"][0]["values"] == ["${var.access_point_arn}"]


def _lambda_role_document_source() -> dict[str, Any]:
    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
    with (INFRA / "modules" / "lambda" / "main.tf").open() as handle:
        source = hcl2.load(handle, serialization_options=options)
    return next(
        data["aws_iam_policy_document"]["this"]
        for data in source["data"]
        if "this" in data.get("aws_iam_policy_document", {})
    )


def test_seeder_role_reads_only_the_weights_prefix_and_writes_efs_through_the_access_point(
    known_arns_plan: dict[str, Any],
) -> None:
    policy = statements(known_arns_plan, "module.seeder.data.aws_iam_policy_document.this")
    assert set(policy) == {
        "SsmAgentRegistersThisInstance",
        "SsmAgentMessageChannels",
        "ListWeightsPrefix",
        "ReadWeights",
        "WriteEfsThroughAccessPoint",
        "DecryptWeights",
    }
    assert policy["ListWeightsPrefix"]["resources"] == ["arn:aws:s3:::acme-weights"]
    assert policy["ListWeightsPrefix"]["conditions"] == {"s3:prefix": ("StringLike", ["models/", "models/*"])}
    assert policy["ReadWeights"]["resources"] == ["arn:aws:s3:::acme-weights/models/*"]
    assert policy["ReadWeights"]["actions"] == {"s3:GetObject", "s3:GetObjectVersion"}
    assert policy["WriteEfsThroughAccessPoint"]["actions"] == {
        "elasticfilesystem:ClientMount",
        "elasticfilesystem:ClientWrite",
    }
    decrypt = policy["DecryptWeights"]
    assert decrypt["resources"] == [WEIGHTS_KEY]
    assert decrypt["conditions"] == {
        "kms:EncryptionContext:aws:s3:arn": (
            "StringLike",
            ["arn:aws:s3:::acme-weights", "arn:aws:s3:::acme-weights/models/*"],
        )
    }
    attached = {
        r["values"]["policy_arn"] for r in resources(known_arns_plan, "aws_iam_role_policy_attachment")
    }
    # Item 15: not AmazonSSMManagedInstanceCore, whose ssm:GetParameter(s) on "*" reads every parameter.
    assert not [arn for arn in attached if "AmazonSSMManagedInstanceCore" in arn]
    assert policy["SsmAgentRegistersThisInstance"]["actions"] == {"ssm:UpdateInstanceInformation"}
    assert policy["SsmAgentRegistersThisInstance"]["resources"] == [
        "arn:aws:ec2:eu-west-1:123456789012:instance/*"
    ]
    channels = policy["SsmAgentMessageChannels"]["actions"]
    assert {a.split(":")[0] for a in channels} == {"ec2messages", "ssmmessages"}
    assert {"ec2messages:GetMessages", "ssmmessages:OpenControlChannel"} <= channels
    every_action = {action for statement in policy.values() for action in statement["actions"]}
    assert not [a for a in every_action if a.startswith("ssm:Get") or a in ("ssm:*", "*")]


def test_efs_policy_denies_plain_nfs_and_grants_mount_and_write_to_the_two_roles(
    known_arns_plan: dict[str, Any],
) -> None:
    policy = statements(known_arns_plan, "module.efs[0].data.aws_iam_policy_document.this")
    deny = policy["DenyInsecureTransport"]
    assert (deny["effect"], deny["actions"]) == ("Deny", {"*"})
    assert deny["conditions"] == {"aws:SecureTransport": ("Bool", ["false"])}
    assert policy["ReadOnlyThroughAccessPoint"]["actions"] == {"elasticfilesystem:ClientMount"}
    assert policy["ReadWriteThroughAccessPoint"]["actions"] == {
        "elasticfilesystem:ClientMount",
        "elasticfilesystem:ClientWrite",
    }
    wiring = module_config(known_arns_plan, "efs")["expressions"]
    assert references(wiring["read_only_role_arns"])[0] == "module.lambda.role_arn"
    assert "module.seeder.role_arn" in references(wiring["read_write_role_arns"])


def test_invoker_policy_allows_invoke_only_through_the_iam_function_url(
    function_plan: dict[str, Any],
) -> None:
    document = json.loads(function_plan["planned_values"]["outputs"]["invoker_policy_json"]["value"])
    by_sid = {s["Sid"]: s for s in document["Statement"]}
    assert set(by_sid) == {"InvokeFunctionUrl", "InvokeFunctionThroughUrl"}
    assert by_sid["InvokeFunctionUrl"]["Action"] == "lambda:InvokeFunctionUrl"
    assert by_sid["InvokeFunctionUrl"]["Condition"] == {
        "StringEquals": {"lambda:FunctionUrlAuthType": "AWS_IAM"}
    }
    assert by_sid["InvokeFunctionThroughUrl"]["Action"] == "lambda:InvokeFunction"
    assert by_sid["InvokeFunctionThroughUrl"]["Condition"] == {
        "Bool": {"lambda:InvokedViaFunctionUrl": "true"}
    }
    function_name = one(function_plan, "aws_lambda_function")["function_name"]
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        assert statement["Resource"].endswith(f":function:{function_name}")


def test_stack_key_policy_admits_the_account_logs_and_alarms_only(root_defaults_plan: dict[str, Any]) -> None:
    policy = json.loads(one(root_defaults_plan, "aws_kms_key")["policy"])
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert set(by_sid) == {
        "AccountAdministration",
        "CloudWatchLogsForThisAccount",
        "CloudWatchAlarmsToEncryptedTopics",
    }
    assert by_sid["AccountAdministration"]["Principal"] == {"AWS": "arn:aws:iam::123456789012:root"}
    logs = by_sid["CloudWatchLogsForThisAccount"]
    assert logs["Principal"] == {"Service": "logs.us-east-1.amazonaws.com"}
    assert logs["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"] == (
        "arn:aws:logs:us-east-1:123456789012:log-group:*"
    )
    assert by_sid["CloudWatchAlarmsToEncryptedTopics"]["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    assert "kms:*" not in by_sid["CloudWatchAlarmsToEncryptedTopics"]["Action"]
    # Item 15: only alarms of this account may use the key (confused-deputy guard).
    assert by_sid["CloudWatchAlarmsToEncryptedTopics"]["Condition"] == {
        "StringEquals": {"aws:SourceAccount": "123456789012"}
    }


def test_log_groups_keep_logs_for_the_retention_and_encrypt_them(known_arns_plan: dict[str, Any]) -> None:
    groups = {
        r["values"]["name"]: r["values"] for r in resources(known_arns_plan, "aws_cloudwatch_log_group")
    }
    assert set(groups) == {"/aws/lambda/sd-iam", "/aws/vpc-flow-logs/sd-iam"}
    for group in groups.values():
        assert group["retention_in_days"] == 365
        assert group["kms_key_id"] == KMS_KEY
    function = one(known_arns_plan, "aws_lambda_function")
    assert function["logging_config"][0]["log_group"] == "/aws/lambda/sd-iam"
    assert function["kms_key_arn"] == KMS_KEY


def test_function_defaults_are_10240_mb_900_s_and_no_reserved_concurrency(
    known_arns_plan: dict[str, Any],
) -> None:
    function = one(known_arns_plan, "aws_lambda_function")
    # Item 3: -1 is the provider's "no reservation"; a new account cannot reserve any (AWS keeps 100
    # unreserved), so a default reservation would fail the first apply.
    assert (function["memory_size"], function["timeout"], function["reserved_concurrent_executions"]) == (
        10240,
        900,
        -1,
    )
    assert function["architectures"] == ["x86_64"]


def test_weights_bucket_is_versioned_kms_encrypted_private_and_tls_only(root_plan: dict[str, Any]) -> None:
    versioning = one(root_plan, "aws_s3_bucket_versioning")["versioning_configuration"]
    assert versioning[0]["status"] == "Enabled"
    rule = one(root_plan, "aws_s3_bucket_server_side_encryption_configuration")["rule"][0]
    assert rule["apply_server_side_encryption_by_default"][0]["sse_algorithm"] == "aws:kms"
    assert rule["bucket_key_enabled"] is True
    block = one(root_plan, "aws_s3_bucket_public_access_block")
    assert all(
        block[key] is True
        for key in (
            "block_public_acls",
            "block_public_policy",
            "ignore_public_acls",
            "restrict_public_buckets",
        )
    )
    assert one(root_plan, "aws_s3_bucket_ownership_controls")["rule"] == [
        {"object_ownership": "BucketOwnerEnforced"}
    ]
    tls = statements(root_plan, "module.weights_bucket.data.aws_iam_policy_document.this[0]")
    deny = tls["DenyInsecureTransport"]
    assert (deny["effect"], deny["actions"], deny["principals"]) == ("Deny", {"s3:*"}, {"*": ["*"]})
    assert deny["conditions"] == {"aws:SecureTransport": ("Bool", ["false"])}


def test_security_group_rules_connect_exactly_the_intended_groups(root_plan: dict[str, Any]) -> None:
    ingress = {r["index"]: r["values"] for r in resources(root_plan, "aws_vpc_security_group_ingress_rule")}
    egress = {r["index"]: r["values"] for r in resources(root_plan, "aws_vpc_security_group_egress_rule")}
    assert set(ingress) == {
        "efs_from_lambda",
        "efs_from_seeder",
        "endpoints_from_seeder",
        "seeder_ssh 203.0.113.0/24",
    }
    assert set(egress) == {"lambda_to_efs", "seeder_to_efs", "seeder_to_s3", "seeder_to_endpoints"}
    ports = {
        key: (v["from_port"], v["to_port"], v["ip_protocol"]) for key, v in {**ingress, **egress}.items()
    }
    assert ports == {
        "efs_from_lambda": (2049, 2049, "tcp"),
        "efs_from_seeder": (2049, 2049, "tcp"),
        "endpoints_from_seeder": (443, 443, "tcp"),
        "seeder_ssh 203.0.113.0/24": (22, 22, "tcp"),
        "lambda_to_efs": (2049, 2049, "tcp"),
        "seeder_to_efs": (2049, 2049, "tcp"),
        "seeder_to_s3": (443, 443, "tcp"),
        "seeder_to_endpoints": (443, 443, "tcp"),
    }
    assert all(v["description"] for v in [*ingress.values(), *egress.values()])
    assert (
        egress["seeder_to_s3"]["prefix_list_id"]
        == data_values(root_plan, "module.network[0].data.aws_ec2_managed_prefix_list.s3")["id"]
    )
    # Group ids are unknown until apply: which group each rule joins is read from the module's source.
    # (The EFS and seeder groups exist only with efs_enabled, hence one(...[*]).)
    network = tfvars(INFRA / "modules" / "network" / "main.tf")
    rules = {k: v for block in network["locals"] for k, v in block.items()}
    wiring = {
        key: (
            rule["security_group_id"],
            rule.get("referenced_security_group_id") or rule.get("prefix_list_id"),
        )
        for key, rule in {**rules["ingress_rules"], **rules["egress_rules"]}.items()
    }
    assert wiring == {
        "efs_from_lambda": ("${one(aws_security_group.efs[*].id)}", "${aws_security_group.lambda.id}"),
        "efs_from_seeder": (
            "${one(aws_security_group.efs[*].id)}",
            "${one(aws_security_group.seeder[*].id)}",
        ),
        "endpoints_from_seeder": (
            "${one(aws_security_group.endpoints[*].id)}",
            "${one(aws_security_group.seeder[*].id)}",
        ),
        "lambda_to_efs": ("${aws_security_group.lambda.id}", "${one(aws_security_group.efs[*].id)}"),
        "seeder_to_efs": ("${one(aws_security_group.seeder[*].id)}", "${one(aws_security_group.efs[*].id)}"),
        "seeder_to_s3": (
            "${one(aws_security_group.seeder[*].id)}",
            "${data.aws_ec2_managed_prefix_list.s3.id}",
        ),
        "seeder_to_endpoints": (
            "${one(aws_security_group.seeder[*].id)}",
            "${one(aws_security_group.endpoints[*].id)}",
        ),
        # Jobs only (jobs_enabled; tests/infra/test_jobs_plan.py): the function's own API path and S3.
        "lambda_endpoint_from_lambda": (
            "${one(aws_security_group.lambda_endpoint[*].id)}",
            "${aws_security_group.lambda.id}",
        ),
        "lambda_to_s3": ("${aws_security_group.lambda.id}", "${data.aws_ec2_managed_prefix_list.s3.id}"),
        "lambda_to_lambda_endpoint": (
            "${aws_security_group.lambda.id}",
            "${one(aws_security_group.lambda_endpoint[*].id)}",
        ),
    }


def test_seeder_launches_only_after_its_network_paths_exist(root_plan: dict[str, Any]) -> None:
    network = module_config(root_plan, "network")["module"]["outputs"]["seeder_security_group_id"]
    assert set(network["depends_on"]) >= {
        "aws_route_table_association.private",
        "aws_vpc_endpoint.s3",
        "aws_vpc_endpoint.ssm",
        "aws_vpc_security_group_egress_rule.this",
    }
    seeder = module_config(root_plan, "seeder")["expressions"]["security_group_ids"]
    assert references(seeder)[0] == "module.network[0].seeder_security_group_id"


def test_new_vpc_s3_endpoint_reads_only_the_weights_bucket_and_aws_package_buckets(
    known_arns_plan: dict[str, Any],
) -> None:
    policy = statements(known_arns_plan, "module.network[0].data.aws_iam_policy_document.s3_endpoint[0]")
    assert policy["ReadStackBuckets"]["resources"] == [
        "arn:aws:s3:::acme-weights",
        "arn:aws:s3:::acme-weights/*",
    ]
    assert policy["ReadStackBuckets"]["actions"] == {"s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket"}
    downloads = policy["AmazonLinuxAndSsmAgentDownloads"]
    assert downloads["actions"] == {"s3:GetObject"}
    assert "arn:aws:s3:::al2023-repos-eu-west-1-de612dc2/*" in downloads["resources"]
    assert all(arn.endswith("/*") and "eu-west-1" in arn for arn in downloads["resources"])
    endpoint = next(
        r["values"]
        for r in resources(known_arns_plan, "aws_vpc_endpoint")
        if r["values"]["vpc_endpoint_type"] == "Gateway"
    )
    rendered = json.loads(endpoint["policy"])
    assert {s["Sid"] for s in rendered["Statement"]} == {
        "ReadStackBuckets",
        "AmazonLinuxAndSsmAgentDownloads",
    }


ROUTE_TABLES = ["rtb-0a1b2c3d4e5f60003"]
CALLER_S3_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": "s3:*", "Resource": "arn:aws:s3:::acme-*"}
        ],
    }
)


def test_existing_vpc_s3_endpoint_is_an_opt_in_with_the_callers_policy() -> None:
    """Item 13: the route tables change only on request, and then with the policy the caller gives."""
    document = plan_existing_vpc(
        {
            "create_s3_endpoint": True,
            "private_route_table_ids": ROUTE_TABLES,
            "s3_endpoint_policy": CALLER_S3_POLICY,
        }
    )

    (gateway,) = [
        r["values"]
        for r in resources(document, "aws_vpc_endpoint")
        if r["values"]["vpc_endpoint_type"] == "Gateway"
    ]
    assert gateway["route_table_ids"] == ROUTE_TABLES
    assert json.loads(gateway["policy"]) == json.loads(CALLER_S3_POLICY)
    assert "module.sd_lambda.module.network[0].data.aws_iam_policy_document.s3_endpoint[0]" not in {
        c["address"] for c in document["resource_changes"]
    }


def test_existing_vpc_s3_endpoint_without_a_policy_keeps_aws_full_access() -> None:
    document = plan_existing_vpc({"create_s3_endpoint": True, "private_route_table_ids": ROUTE_TABLES})

    gateway = next(
        c
        for c in document["resource_changes"]
        if c["type"] == "aws_vpc_endpoint" and c["change"]["after"]["vpc_endpoint_type"] == "Gateway"
    )
    assert gateway["change"]["after"].get("policy") is None  # left for AWS: full access


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"private_route_table_ids": ROUTE_TABLES},
            "private_route_table_ids are only used with create_s3_endpoint = true",
        ),
        ({"create_s3_endpoint": True}, "create_s3_endpoint = true needs private_route_table_ids"),
    ],
    ids=["route-tables-without-opt-in", "opt-in-without-route-tables"],
)
def test_existing_vpc_routing_is_never_changed_by_accident(variables: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError) as caught:
        plan_existing_vpc(variables)
    errors = [d for d in caught.value.diagnostics if d.severity == "error"]
    assert [message in " ".join(e.detail.split()) for e in errors] == [True]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"aws_vpc": {"enable_dns_support": False, "enable_dns_hostnames": True}},
            "DNS resolution (enableDnsSupport) turned off",
        ),
        (
            {"aws_vpc": {"enable_dns_support": True, "enable_dns_hostnames": False}},
            "DNS hostnames (enableDnsHostnames) turned off",
        ),
        (
            {"aws_subnet": {"availability_zone": "eu-central-1b"}},
            "private_subnet_ids must each be in a different availability zone",
        ),
    ],
    ids=["dns-support-off", "dns-hostnames-off", "subnets-in-one-zone"],
)
def test_existing_vpc_preconditions_stop_the_plan_with_one_message_each(
    data: dict[str, Any], message: str
) -> None:
    """Item 14: read through aws_vpc / aws_subnet before anything is created."""
    with pytest.raises(PlanError) as caught:
        plan_existing_vpc({}, data)
    errors = [" ".join(d.detail.split()) for d in caught.value.diagnostics if d.severity == "error"]
    assert len(errors) == 1, errors
    assert message in errors[0]


def test_existing_vpc_example_passes_the_weights_bucket_key_to_the_seeder(
    existing_vpc_plan: dict[str, Any],
) -> None:
    configured = tfvars(EXAMPLE_VARS / "existing-vpc.tfvars")
    policy = statements(existing_vpc_plan, "module.sd_lambda.module.seeder.data.aws_iam_policy_document.this")
    assert policy["DecryptWeights"]["resources"] == [configured["weights_bucket_kms_key_arn"]]


def test_flow_logs_role_trusts_only_this_accounts_flow_logs(root_defaults_plan: dict[str, Any]) -> None:
    trust = statements(
        root_defaults_plan, "module.network[0].data.aws_iam_policy_document.flow_logs_assume[0]"
    )
    (statement,) = trust.values()
    assert statement["principals"] == {"Service": ["vpc-flow-logs.amazonaws.com"]}
    assert statement["conditions"] == {
        "aws:SourceAccount": ("StringEquals", ["123456789012"]),
        "aws:SourceArn": ("ArnLike", ["arn:aws:ec2:us-east-1:123456789012:vpc-flow-log/*"]),
    }
    write = statements(root_defaults_plan, "module.network[0].data.aws_iam_policy_document.flow_logs[0]")
    (logs,) = write.values()
    assert logs["actions"] == {"logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"}


def test_ecr_lifecycle_keeps_the_deployed_image_first_then_the_last_git_images(
    any_plan: dict[str, Any],
) -> None:
    """Item 17: `deploy apply` tags the running digest deployed-<time>; rule 1 keeps the last K of those.

    Rule 1 must outrank the git-* rule: an image a higher-priority rule matched is never expired by a lower
    one (LifecyclePolicies.html), so N later git-* pushes cannot expire the image the function runs.
    """
    rules = json.loads(one(any_plan, "aws_ecr_lifecycle_policy")["policy"])["rules"]
    by_priority = {rule["rulePriority"]: rule for rule in rules}
    assert sorted(by_priority) == [1, 2, 3]
    deployed, git, untagged = (by_priority[priority]["selection"] for priority in (1, 2, 3))
    assert deployed == {
        "tagStatus": "tagged",
        "tagPatternList": ["deployed-*"],
        "countType": "imageCountMoreThan",
        "countNumber": 3,
    }
    assert git == {
        "tagStatus": "tagged",
        "tagPatternList": ["git-*"],
        "countType": "imageCountMoreThan",
        "countNumber": 10,
    }
    assert untagged == {"tagStatus": "untagged", "countType": "imageCountMoreThan", "countNumber": 10}
    assert all(rule["action"] == {"type": "expire"} for rule in rules)
    # No `any` rule: it would count (and could expire) whatever the operator tagged by hand.
    assert "any" not in {rule["selection"]["tagStatus"] for rule in rules}


def test_the_deployed_image_count_is_passed_through_from_the_root(root_defaults_plan: dict[str, Any]) -> None:
    """ecr_keep_deployments reaches rule 1; the default plan must not only hold by coincidence."""
    variables = root_defaults_plan["variables"]
    assert variables["ecr_keep_deployments"]["value"] == 3
    module_call = root_defaults_plan["configuration"]["root_module"]["module_calls"]["lambda"]
    assert (
        module_call["expressions"]["repository_keep_deployments"]["references"][0]
        == "var.ecr_keep_deployments"
    )


def test_ecr_pull_is_granted_to_this_function_exactly(known_arns_plan: dict[str, Any]) -> None:
    """Item 15: `function:sd-iam*` also matched sd-iam-dev; the ARN and its qualifiers only now."""
    policy = statements(known_arns_plan, "module.lambda.data.aws_iam_policy_document.repository")
    (pull,) = policy.values()
    test, values = pull["conditions"]["aws:sourceArn"]
    arn = "arn:aws:lambda:eu-west-1:123456789012:function:sd-iam"
    assert (test, values) == ("StringLike", [arn, f"{arn}:*"])
    for other in (f"{arn}-dev", f"{arn}2", f"{arn}-dev:live"):
        assert not [pattern for pattern in values if fnmatch.fnmatchcase(other, pattern)], other
    assert [pattern for pattern in values if fnmatch.fnmatchcase(f"{arn}:live", pattern)]


def test_invoker_principals_get_the_documented_function_url_grant(known_arns_plan: dict[str, Any]) -> None:
    """Item 19: the resource-based grant AWS documents (AddPermission with FunctionUrlAuthType and
    InvokedViaFunctionUrl), one pair per principal, since the identity policy's condition key is not
    documented for identity policies."""
    permissions = [r["values"] for r in resources(known_arns_plan, "aws_lambda_permission")]
    by_action: dict[str, list[dict[str, Any]]] = {}
    for permission in permissions:
        by_action.setdefault(permission["action"], []).append(permission)
    assert set(by_action) == {"lambda:InvokeFunctionUrl", "lambda:InvokeFunction"}
    for granted in by_action.values():
        assert sorted(p["principal"] for p in granted) == sorted(INVOKERS)
        assert {p["function_name"] for p in granted} == {"sd-iam"}
    assert {p["function_url_auth_type"] for p in by_action["lambda:InvokeFunctionUrl"]} == {"AWS_IAM"}
    assert {p["invoked_via_function_url"] for p in by_action["lambda:InvokeFunction"]} == {True}


def test_root_exposes_tracing_log_level_seeder_volume_and_zones(known_arns_plan: dict[str, Any]) -> None:
    """Item 16: the root passes these through to the resources that use them."""
    function = one(known_arns_plan, "aws_lambda_function")
    assert function["tracing_config"] == [{"mode": "PassThrough"}]
    assert function["logging_config"][0]["application_log_level"] == "WARN"
    assert one(known_arns_plan, "aws_instance")["root_block_device"][0]["volume_size"] == 40
    zones = sorted(r["values"]["availability_zone"] for r in resources(known_arns_plan, "aws_subnet"))
    assert zones == ["eu-west-1b", "eu-west-1c"]
    assert not [
        r
        for r in resources(known_arns_plan, "aws_iam_role_policy_attachment")
        if "XRay" in r["values"]["policy_arn"]
    ]


def test_root_outputs_give_a_consumer_what_it_needs(known_arns_plan: dict[str, Any]) -> None:
    """Item 16: <thing>_<attr> outputs for the function, roles, bucket, file system and network."""
    outputs = {
        name: entry.get("value") for name, entry in known_arns_plan["planned_values"]["outputs"].items()
    }
    assert outputs["function_name"] == "sd-iam"
    assert outputs["weights_bucket_name"] == "acme-weights"
    assert outputs["weights_bucket_arn"] == "arn:aws:s3:::acme-weights"
    # Unknown until apply (ids, ARNs) are left out of planned_values but listed in output_changes.
    assert {
        "function_arn",
        "function_url",
        "function_role_arn",
        "seeder_role_arn",
        "seeder_instance_id",
        "efs_file_system_id",
        "efs_file_system_arn",
        "efs_access_point_id",
        "efs_access_point_arn",
        "function_security_group_id",
        "efs_security_group_id",
        "seeder_security_group_id",
        "private_subnet_ids",
    } <= set(known_arns_plan["output_changes"])


def test_no_invoker_principals_means_no_resource_policy(root_plan: dict[str, Any]) -> None:
    assert resources(root_plan, "aws_lambda_permission") == []


def test_roles_take_the_given_path_and_permissions_boundary(known_arns_plan: dict[str, Any]) -> None:
    """Item 15: optional role path and permissions boundary reach every role the stack creates."""
    roles = resources(known_arns_plan, "aws_iam_role")
    assert {r["address"] for r in roles} == {
        "module.lambda.aws_iam_role.this",
        "module.network[0].aws_iam_role.flow_logs[0]",
        "module.seeder.aws_iam_role.this[0]",
    }
    for role in roles:
        assert (role["values"]["path"], role["values"]["permissions_boundary"]) == (ROLE_PATH, BOUNDARY), (
            role["address"]
        )
    assert one(known_arns_plan, "aws_iam_instance_profile")["path"] == ROLE_PATH


def test_roles_default_to_the_root_path_and_no_boundary(root_plan: dict[str, Any]) -> None:
    for role in resources(root_plan, "aws_iam_role"):
        assert role["values"]["path"] == "/"
        assert role["values"].get("permissions_boundary") is None


def test_mount_targets_are_keyed_by_zone_or_subnet(
    root_plan: dict[str, Any], existing_vpc_plan: dict[str, Any]
) -> None:
    zones = sorted(s["values"]["availability_zone"] for s in resources(root_plan, "aws_subnet"))
    assert sorted(r["index"] for r in resources(root_plan, "aws_efs_mount_target")) == zones
    assert len(zones) == 2
    configured = tfvars(EXAMPLE_VARS / "existing-vpc.tfvars")["private_subnet_ids"]
    existing = {
        r["index"]: r["values"]["subnet_id"] for r in resources(existing_vpc_plan, "aws_efs_mount_target")
    }
    assert existing == {subnet: subnet for subnet in configured}


def test_deploy_driver_addresses_exist_in_the_stack(root_plan: dict[str, Any]) -> None:
    addresses = {c["address"] for c in root_plan["resource_changes"]}
    assert set(REGISTRY_TARGETS) <= addresses
    assert FUNCTION_ADDRESS in addresses
    assert "image_uri" in root_plan["planned_values"]["outputs"]
    assert root_plan["planned_values"]["outputs"]["image_uri"]["value"] == tfvars(ROOT_VARS)["image_uri"]


def test_moved_rules_land_on_planned_addresses(root_plan: dict[str, Any]) -> None:
    """A typo in a moved block's target would silently recreate that rule on upgrade."""
    moved = tfvars(INFRA / "modules" / "network" / "moved.tf")["moved"]
    planned = {c["address"] for c in root_plan["resource_changes"]}
    targets = {f"module.network[0].{block['to']}".replace("${", "").replace("}", "") for block in moved}
    assert len(targets) == 9
    assert targets <= planned, targets - planned
