"""The offline plan answers data sources for the region the configuration asks for.

The region comes, as in the aws provider 6.x, from a data source's own ``region`` argument, else the
provider block's ``region``, else ``AWS_REGION``, else ``AWS_DEFAULT_REGION``
(https://hashicorp.github.io/terraform-provider-aws/enhanced-region-support,
https://registry.terraform.io/providers/hashicorp/aws/latest/docs#region).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sd_lambda.devtools.tfcheck import PlanError, plan
from sd_lambda.devtools.tfcheck.datasources import NotFound, World, read_data_source
from sd_lambda.devtools.tfcheck.planning import ProviderSettings
from sd_lambda.devtools.tfcheck.schema import load_schema

REPOSITORY = Path(__file__).resolve().parents[3]
INFRA = REPOSITORY / "infra"
OFFLINE_VARS = REPOSITORY / "tests" / "infra" / "offline.tfvars"  # region = "eu-west-1"
US_EAST_1 = World(region="us-east-1", account_id="111122223333")

# Data sources as this project reads them: zones filtered to the region's regular ones, the S3 prefix list
# by its regional name, the AL2023 AMI parameter; plus one zone list pinned to another region.
STACK = """
{provider}
data "aws_region" "current" {{}}

data "aws_availability_zones" "regular" {{
  state = "available"
  filter {{
    name   = "zone-name"
    values = ["${{data.aws_region.current.region}}?"]
  }}
}}

data "aws_availability_zones" "pinned" {{
  region = "ap-southeast-2"
}}

data "aws_ec2_managed_prefix_list" "s3" {{
  name = "com.amazonaws.${{data.aws_region.current.region}}.s3"
}}

data "aws_ssm_parameter" "al2023" {{
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}}

output "zones" {{
  value = data.aws_availability_zones.regular.names
}}

output "zone_ids" {{
  value = data.aws_availability_zones.regular.zone_ids
}}

output "pinned_zones" {{
  value = data.aws_availability_zones.pinned.names
}}

output "prefix_list_arn" {{
  value = data.aws_ec2_managed_prefix_list.s3.arn
}}

output "ami" {{
  value = data.aws_ssm_parameter.al2023.insecure_value
}}

output "ami_parameter_arn" {{
  value = data.aws_ssm_parameter.al2023.arn
}}
"""


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def _read(schema, type_name: str, world: World, **config: Any) -> dict[str, Any]:
    block = schema.data_source_block(type_name)
    return read_data_source(type_name, block, dict.fromkeys(block["attributes"]) | config, world, {})


def _outputs(directory: Path) -> dict[str, Any]:
    document = plan(directory, {})
    return {name: change["after"] for name, change in document["output_changes"].items()}


def _stack(tmp_path: Path, provider: str) -> Path:
    directory = tmp_path / "stack"
    directory.mkdir()
    (directory / "main.tf").write_text(STACK.format(provider=provider))
    return directory


# ---- the data sources on their own -------------------------------------------------------------------


def test_a_data_source_region_argument_wins_over_the_providers(schema) -> None:
    zones = _read(schema, "aws_availability_zones", US_EAST_1, region="eu-west-1")
    assert zones["names"] == ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
    assert zones["zone_ids"] == ["euw1-az1", "euw1-az2", "euw1-az3"]
    assert zones["region"] == "eu-west-1"
    unset = _read(schema, "aws_availability_zones", US_EAST_1)
    assert (unset["names"][0], unset["region"]) == ("us-east-1a", "us-east-1")


def test_zone_filters_and_exclusions_apply_as_ec2_applies_them(schema) -> None:
    def names(**config: Any) -> list[str]:
        return _read(schema, "aws_availability_zones", US_EAST_1, region="eu-west-1", **config)["names"]

    assert names(filter=[{"name": "zone-name", "values": ["eu-west-1?"]}]) == [
        "eu-west-1a",
        "eu-west-1b",
        "eu-west-1c",
    ]
    # Another region's pattern matches nothing here, as it would in AWS.
    assert names(filter=[{"name": "zone-name", "values": ["us-east-1?"]}]) == []
    assert names(filter=[{"name": "zone-id", "values": ["euw1-az2", "euw1-az3"]}]) == [
        "eu-west-1b",
        "eu-west-1c",
    ]
    assert names(exclude_names=["eu-west-1a"], exclude_zone_ids=["euw1-az3"]) == ["eu-west-1b"]


def test_prefix_list_and_ami_parameter_follow_the_region(schema) -> None:
    name = "com.amazonaws.eu-west-1.s3"
    s3 = _read(schema, "aws_ec2_managed_prefix_list", US_EAST_1, region="eu-west-1", name=name)
    assert s3["arn"] == f"arn:aws:ec2:eu-west-1:aws:prefix-list/{s3['id']}"
    assert (s3["owner_id"], s3["name"]) == ("AWS", "com.amazonaws.eu-west-1.s3")
    parameter = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
    here = _read(schema, "aws_ssm_parameter", US_EAST_1, region="eu-west-1", name=parameter)
    there = _read(schema, "aws_ssm_parameter", US_EAST_1, name=parameter)
    assert here["arn"] == f"arn:aws:ssm:eu-west-1::parameter{parameter}"
    assert here["value"].startswith("ami-")
    assert here["value"] != there["value"]  # same public parameter, a different image per region


def test_another_regions_prefix_list_is_not_found(schema) -> None:
    with pytest.raises(NotFound, match=r"named 'com\.amazonaws\.us-east-1\.s3' in eu-west-1"):
        _read(
            schema,
            "aws_ec2_managed_prefix_list",
            US_EAST_1,
            region="eu-west-1",
            name="com.amazonaws.us-east-1.s3",
        )


@pytest.mark.parametrize(
    ("config", "environ", "region"),
    [
        ({"region": "eu-north-1"}, {"AWS_REGION": "ca-central-1"}, "eu-north-1"),
        ({}, {"AWS_REGION": "ca-central-1", "AWS_DEFAULT_REGION": "sa-east-1"}, "ca-central-1"),
        ({}, {"AWS_DEFAULT_REGION": "sa-east-1"}, "sa-east-1"),
        ({}, {}, None),
    ],
)
def test_provider_region_comes_from_the_block_then_the_environment(
    config: dict[str, str], environ: dict[str, str], region: str | None
) -> None:
    assert ProviderSettings.from_config(config, environ).region == region


# ---- through Terraform -------------------------------------------------------------------------------


def test_a_plan_reads_zones_prefix_list_and_ami_for_the_provider_region(tmp_path: Path) -> None:
    outputs = _outputs(_stack(tmp_path, 'provider "aws" {\n  region = "eu-west-1"\n}\n'))
    assert outputs["zones"] == ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
    assert outputs["zone_ids"] == ["euw1-az1", "euw1-az2", "euw1-az3"]
    assert outputs["pinned_zones"] == ["ap-southeast-2a", "ap-southeast-2b", "ap-southeast-2c"]
    assert outputs["prefix_list_arn"].startswith("arn:aws:ec2:eu-west-1:aws:prefix-list/pl-")
    assert outputs["ami_parameter_arn"].startswith("arn:aws:ssm:eu-west-1::parameter/aws/service/")


def test_without_a_provider_region_the_plan_follows_aws_region(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    outputs = _outputs(_stack(tmp_path, ""))
    assert outputs["zones"] == ["eu-central-1a", "eu-central-1b", "eu-central-1c"]
    assert outputs["prefix_list_arn"].startswith("arn:aws:ec2:eu-central-1:aws:prefix-list/")


def test_a_prefix_list_named_for_another_region_fails_the_plan(tmp_path: Path) -> None:
    directory = tmp_path / "stack"
    directory.mkdir()
    (directory / "main.tf").write_text(
        'provider "aws" {\n  region = "eu-west-1"\n}\n\n'
        'data "aws_ec2_managed_prefix_list" "s3" {\n  name = "com.amazonaws.us-east-1.s3"\n}\n'
    )
    with pytest.raises(PlanError) as raised:
        plan(directory, {})
    (error,) = [d for d in raised.value.diagnostics if d.severity == "error"]
    assert error.summary == (
        "reading aws_ec2_managed_prefix_list: no EC2 managed prefix list named 'com.amazonaws.us-east-1.s3' "
        "in eu-west-1; AWS-managed ones there are named com.amazonaws.eu-west-1.<service>"
    )
    assert "Traceback" not in error.detail


def test_the_project_stack_planned_for_eu_west_1_puts_its_subnets_in_eu_west_1() -> None:
    # The root stack has no provider block: the region reaches its data sources as their `region`.
    document = plan(INFRA, {}, var_files=[OFFLINE_VARS])
    resources = _all_resources(document["planned_values"]["root_module"])
    zones = sorted(r["values"]["availability_zone"] for r in resources if r["type"] == "aws_subnet")
    assert zones == ["eu-west-1a", "eu-west-1b"]
    read = _all_resources(document["prior_state"]["values"]["root_module"])
    data = {r["address"]: r["values"] for r in read}
    prefix_list = data["module.network[0].data.aws_ec2_managed_prefix_list.s3"]  # count: EFS mode has one
    assert prefix_list["name"] == "com.amazonaws.eu-west-1.s3"
    assert ":eu-west-1:" in prefix_list["arn"]


def _all_resources(module: dict[str, Any]) -> list[dict[str, Any]]:
    found = list(module.get("resources", []))
    for child in module.get("child_modules", []):
        found += _all_resources(child)
    return found
