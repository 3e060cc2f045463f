"""Offline ``terraform plan`` of the fixture stack: assertions on the ``terraform show -json`` document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sd_lambda.devtools.tfcheck import PlanError, TfCheckError, plan, plan_summary
from sd_lambda.devtools.tfcheck.schema import load_schema

from .conftest import FIXTURES, POSITIVE

VARIABLES = {
    "region": "eu-west-1",
    "name": "tfcheck-fixture",
    "image_uri": "111122223333.dkr.ecr.eu-west-1.amazonaws.com/sd-lambda:offline",
    "memory_size": 6144,
    "timeout": 90,
    "mount_path": "/mnt/models",
    "tags": {"Project": "sd-lambda", "Stack": "plan-test"},
}
OVERRIDES = {
    "aws_caller_identity": {"account_id": "111122223333"},
    "aws_availability_zones": {"names": ["eu-west-1x", "eu-west-1y", "eu-west-1z"]},
}


def _resources(module: dict[str, Any]) -> list[dict[str, Any]]:
    found = list(module.get("resources", []))
    for child in module.get("child_modules", []):
        found += _resources(child)
    return found


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return plan(POSITIVE, VARIABLES, data_overrides=OVERRIDES)


@pytest.fixture(scope="module")
def planned(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["address"]: r for r in _resources(document["planned_values"]["root_module"])}


def test_plan_creates_the_whole_stack(document: dict[str, Any]) -> None:
    summary = dict(plan_summary(document))
    assert summary["aws_lambda_function.generate"] == "create"
    assert summary["module.storage.aws_efs_access_point.models"] == "create"
    assert summary["module.storage.aws_efs_mount_target.this[1]"] == "create"
    assert document["errored"] is False
    assert {a for a in summary.values()} <= {"create", "read"}


def test_function_url_requires_iam(planned: dict[str, dict[str, Any]]) -> None:
    assert planned["aws_lambda_function_url.generate"]["values"]["authorization_type"] == "AWS_IAM"


def test_lambda_memory_timeout_and_mount_path_as_configured(planned: dict[str, dict[str, Any]]) -> None:
    function = planned["aws_lambda_function.generate"]["values"]
    assert (function["memory_size"], function["timeout"]) == (6144, 90)
    assert function["file_system_config"][0]["local_mount_path"] == "/mnt/models"
    assert function["environment"][0]["variables"]["MODEL_ROOT"] == "/mnt/models"


def test_efs_encrypted_and_access_point_not_at_root(planned: dict[str, dict[str, Any]]) -> None:
    assert planned["module.storage.aws_efs_file_system.this"]["values"]["encrypted"] is True
    root_directory = planned["module.storage.aws_efs_access_point.models"]["values"]["root_directory"][0]
    assert root_directory["path"] not in ("/", "")


def test_no_rule_opens_nfs_or_ssh_to_the_world(planned: dict[str, dict[str, Any]]) -> None:
    rules = [r["values"] for r in planned.values() if r["type"].startswith("aws_vpc_security_group_")]
    assert rules, "the fixture has security group rules to check"
    for rule in rules:
        opens_world = rule.get("cidr_ipv4") == "0.0.0.0/0" or rule.get("cidr_ipv6") == "::/0"
        assert not (opens_world and rule["from_port"] <= 2049 <= rule["to_port"])
        assert not (opens_world and rule["from_port"] <= 22 <= rule["to_port"])


def test_every_taggable_resource_carries_the_stack_tags(planned: dict[str, dict[str, Any]]) -> None:
    schema = load_schema()
    taggable = [
        r
        for r in planned.values()
        if r["mode"] == "managed" and "tags_all" in schema.resource_block(r["type"])["attributes"]
    ]
    assert len(taggable) >= 8
    for resource in taggable:
        assert resource["values"]["tags_all"] == VARIABLES["tags"], resource["address"]


def test_computed_attributes_are_unknown_until_apply(document: dict[str, Any]) -> None:
    change = next(c for c in document["resource_changes"] if c["address"] == "aws_lambda_function.generate")
    assert change["change"]["after_unknown"]["arn"] is True
    assert change["change"]["after_unknown"]["invoke_arn"] is True
    assert change["change"]["after"]["region"] == "eu-west-1"


def test_data_overrides_reach_the_plan(planned: dict[str, dict[str, Any]]) -> None:
    function = planned["aws_lambda_function.generate"]["values"]
    assert function["environment"][0]["variables"]["ACCOUNT_ID"] == "111122223333"
    assert function["environment"][0]["variables"]["REGION"] == "eu-west-1"
    zones = [planned[f"aws_subnet.private[{i}]"]["values"]["availability_zone"] for i in (0, 1)]
    assert zones == ["eu-west-1x", "eu-west-1y"]


def test_policy_documents_are_rendered_from_their_statements(document: dict[str, Any]) -> None:
    assume = json.loads(document["output_changes"]["assume_role_policy"]["after"])
    assert assume == {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"Service": "lambda.amazonaws.com"}}
        ],
    }


def test_backend_block_is_replaced_by_a_throwaway_local_backend() -> None:
    directory = FIXTURES / "backend_s3"
    before = sorted(p.name for p in directory.iterdir())
    document = plan(directory, {})
    assert dict(plan_summary(document)) == {"aws_efs_file_system.models": "create"}
    assert sorted(p.name for p in directory.iterdir()) == before


def test_missing_variable_is_a_plan_error_with_its_location() -> None:
    variables = {k: v for k, v in VARIABLES.items() if k != "image_uri"}
    with pytest.raises(PlanError) as raised:
        plan(POSITIVE, variables)
    errors = [(d.filename, d.line, d.summary) for d in raised.value.diagnostics if d.severity == "error"]
    assert errors == [("variables.tf", 9, "No value for required variable")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aws_nope": {"id": "x"}}, "'aws_nope' is not an aws data source"),
        ({"aws_region": {"colour": "x"}}, "aws_region has no attribute 'colour'"),
    ],
)
def test_bad_data_overrides_are_rejected_before_terraform_runs(overrides: dict, message: str) -> None:
    with pytest.raises(TfCheckError, match=message):
        plan(POSITIVE, VARIABLES, data_overrides=overrides)


def test_planning_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TfCheckError, match=r"has no \*\.tf"):
        plan(tmp_path, {})


def _stack_with_state(directory: Path, tag: str) -> tuple[Path, Path]:
    """A one-resource stack and a state file that already holds that resource (tagged ``Name = old``)."""
    directory.mkdir()
    (directory / "main.tf").write_text(
        'provider "aws" {\n  region = "us-east-1"\n}\n\n'
        'resource "aws_efs_file_system" "models" {\n'
        '  creation_token = "tfcheck"\n  encrypted      = true\n'
        f'  tags = {{\n    Name = "{tag}"\n  }}\n}}\n'
    )
    attributes = {
        "id": "fs-0123456789abcdef0",
        "arn": "arn:aws:elasticfilesystem:us-east-1:123456789012:file-system/fs-0123456789abcdef0",
        "creation_token": "tfcheck",
        "encrypted": True,
        "region": "us-east-1",
        "tags": {"Name": "old"},
        "tags_all": {"Name": "old"},
    }
    state = {
        "version": 4,
        "terraform_version": "1.15.5",
        "serial": 1,
        "lineage": "7e1a3d6c-0000-4000-8000-000000000001",
        "outputs": {},
        "resources": [
            {
                "mode": "managed",
                "type": "aws_efs_file_system",
                "name": "models",
                "provider": 'provider["registry.terraform.io/hashicorp/aws"]',
                "instances": [{"schema_version": 0, "attributes": attributes, "sensitive_attributes": []}],
            }
        ],
    }
    state_file = directory.parent / f"{directory.name}.tfstate"
    state_file.write_text(json.dumps(state))
    return directory, state_file


def test_existing_state_is_upgraded_refreshed_and_left_alone_when_unchanged(tmp_path: Path) -> None:
    directory, state = _stack_with_state(tmp_path / "stack", "old")
    document = plan(directory, {}, state=state)
    assert plan_summary(document) == [("aws_efs_file_system.models", "no-op")]
    assert document["prior_state"]["values"]["root_module"]["resources"][0]["values"]["id"] == (
        "fs-0123456789abcdef0"
    )


def test_changed_tags_plan_an_in_place_update_of_tags_all(tmp_path: Path) -> None:
    directory, state = _stack_with_state(tmp_path / "stack", "new")
    document = plan(directory, {}, state=state)
    (change,) = document["resource_changes"]
    assert change["change"]["actions"] == ["update"]
    assert change["change"]["before"]["tags_all"] == {"Name": "old"}
    assert change["change"]["after"]["tags_all"] == {"Name": "new"}
    assert change["change"]["after"]["id"] == "fs-0123456789abcdef0"
