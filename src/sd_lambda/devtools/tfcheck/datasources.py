"""Plausible results for data sources, so offline plans see realistic values instead of nulls.

Every data source gets its configured values back; computed attributes the configuration left null
are filled from, in order: the caller's overrides for that type, a per-type default below, and a
placeholder of the right cty type. Defaults stay consistent with each other: the account, region and
partition a plan sees come from one :class:`World`, which overrides can change.

Answers are for the data source's *effective region*: its own ``region`` argument when set, else the
provider's region (aws provider 6.x, https://hashicorp.github.io/terraform-provider-aws/enhanced-region-support).
So zones, prefix lists, AMI ids and ARNs read in eu-west-1 name eu-west-1, whatever the provider says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sd_lambda.devtools.tfcheck.planning import fill_computed
from sd_lambda.devtools.tfcheck.schema import Block

DataOverrides = dict[str, dict[str, Any]]


class NotFound(Exception):
    """What AWS would answer for this read: nothing matches. Terraform shows it as the data source's error."""


# Zone letters a new region offers; every region has at least three
# (https://docs.aws.amazon.com/global-infrastructure/latest/regions/aws-availability-zones.html).
ZONE_LETTERS = "abc"


@dataclass(frozen=True)
class World:
    """The account a plan pretends to run in."""

    region: str = "us-east-1"
    account_id: str = "123456789012"
    partition: str = "aws"

    @classmethod
    def from_overrides(cls, provider_region: str | None, overrides: DataOverrides) -> World:
        region_override = overrides.get("aws_region", {})
        region = region_override.get("region") or region_override.get("name") or provider_region
        return cls(
            region=region or cls.region,
            account_id=overrides.get("aws_caller_identity", {}).get("account_id") or cls.account_id,
            partition=overrides.get("aws_partition", {}).get("partition") or cls.partition,
        )

    def in_region(self, region: str) -> World:
        return dataclasses.replace(self, region=region)

    def arn(self, service: str, resource: str, *, regional: bool = True, account: str | None = None) -> str:
        region = self.region if regional else ""
        owner = self.account_id if account is None else account
        return f"arn:{self.partition}:{service}:{region}:{owner}:{resource}"


def _stable_hex(*parts: str, length: int) -> str:
    """Hex digits that are the same for the same inputs on every run, so plans are reproducible."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def example_ami_id(region: str, parameter_name: str) -> str:
    """The AMI id a public image parameter resolves to: same name, a different image in each region."""
    return f"ami-{_stable_hex(region, parameter_name, length=17)}"


def zone_id(region: str, index: int) -> str:
    """``euw1-az1``: the region code's first three letters, its trailing number, ``-az`` and a number.

    https://docs.aws.amazon.com/global-infrastructure/latest/regions/aws-availability-zones.html
    """
    letters = "".join(ch for ch in region if ch.isalpha())[:3]
    number = region.rsplit("-", 1)[-1]
    return f"{letters}{number}-az{index}"


def _filter_pattern(value: str) -> re.Pattern[str]:
    """An EC2 filter value: ``*`` matches any run of characters, ``?`` exactly one.

    https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/Using_Filtering.html
    """
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value))


def _matches_filters(candidate: dict[str, str], filters: list[dict[str, Any]]) -> bool:
    """EC2 semantics: filters AND together, a filter's values OR together; unknown names match all."""
    for item in filters:
        field_value = candidate.get(item["name"])
        if field_value is None:
            continue
        if not any(_filter_pattern(v).fullmatch(field_value) for v in item["values"]):
            return False
    return True


def _one_or_list(values: list[str]) -> str | list[str]:
    ordered = sorted(values)
    return ordered[0] if len(ordered) == 1 else ordered


def _principals(blocks: list[dict[str, Any]]) -> str | dict[str, Any]:
    if len(blocks) == 1 and blocks[0]["type"] == "*" and list(blocks[0]["identifiers"]) == ["*"]:
        return "*"
    merged: dict[str, list[str]] = {}
    for principal in blocks:
        merged.setdefault(principal["type"], []).extend(principal["identifiers"])
    return {kind: _one_or_list(ids) for kind, ids in sorted(merged.items())}


def _statement(config: dict[str, Any]) -> dict[str, Any]:
    statement: dict[str, Any] = {}
    if config.get("sid"):
        statement["Sid"] = config["sid"]
    statement["Effect"] = config.get("effect") or "Allow"
    for key, json_key in (
        ("actions", "Action"),
        ("not_actions", "NotAction"),
        ("resources", "Resource"),
        ("not_resources", "NotResource"),
    ):
        if config.get(key):
            statement[json_key] = _one_or_list(config[key])
    if config.get("principals"):
        statement["Principal"] = _principals(config["principals"])
    if config.get("not_principals"):
        statement["NotPrincipal"] = _principals(config["not_principals"])
    if config.get("condition"):
        conditions: dict[str, dict[str, Any]] = {}
        for condition in config["condition"]:
            values = list(condition["values"])
            conditions.setdefault(condition["test"], {})[condition["variable"]] = (
                values[0] if len(values) == 1 else values
            )
        statement["Condition"] = conditions
    return statement


def render_policy_document(config: dict[str, Any]) -> dict[str, Any]:
    """The IAM policy ``aws_iam_policy_document`` renders: source documents, statements, overrides.

    Statements with a ``Sid`` replace earlier ones with the same ``Sid``, as the real data source does.
    """
    document: dict[str, Any] = {"Version": config.get("version") or "2012-10-17"}
    if config.get("policy_id"):
        document["Id"] = config["policy_id"]
    statements: list[dict[str, Any]] = []

    def add(statement: dict[str, Any]) -> None:
        sid = statement.get("Sid")
        for index, existing in enumerate(statements):
            if sid and existing.get("Sid") == sid:
                statements[index] = statement
                return
        statements.append(statement)

    for source in config.get("source_policy_documents") or []:
        for statement in _as_list(json.loads(source).get("Statement")):
            add(statement)
    for statement in config.get("statement") or []:
        add(_statement(statement))
    for override in config.get("override_policy_documents") or []:
        for statement in _as_list(json.loads(override).get("Statement")):
            add(statement)
    document["Statement"] = statements
    return document


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _policy_document(config: dict[str, Any], world: World) -> dict[str, Any]:
    document = render_policy_document(config)
    minified = json.dumps(document, separators=(",", ":"))
    return {
        "json": json.dumps(document, indent=2),
        "minified_json": minified,
        "id": str(int(hashlib.sha256(minified.encode()).hexdigest()[:8], 16)),
    }


def _availability_zones(config: dict[str, Any], world: World) -> dict[str, Any]:
    zones = [
        {
            "zone-name": f"{world.region}{letter}",
            "zone-id": zone_id(world.region, index),
            "region-name": world.region,
            "group-name": world.region,
            "state": "available",
            "zone-type": "availability-zone",
            "opt-in-status": "opt-in-not-required",
        }
        for index, letter in enumerate(ZONE_LETTERS, start=1)
    ]
    excluded_names = set(config.get("exclude_names") or ())
    excluded_ids = set(config.get("exclude_zone_ids") or ())
    state = config.get("state")
    kept = [
        zone
        for zone in zones
        if zone["zone-name"] not in excluded_names
        and zone["zone-id"] not in excluded_ids
        and (state is None or zone["state"] == state)
        and _matches_filters(zone, config.get("filter") or [])
    ]
    return {
        "id": world.region,
        "names": [zone["zone-name"] for zone in kept],
        "zone_ids": [zone["zone-id"] for zone in kept],
        "group_names": sorted({zone["group-name"] for zone in kept}),
    }


def _caller_identity(config: dict[str, Any], world: World) -> dict[str, Any]:
    return {
        "id": world.account_id,
        "account_id": world.account_id,
        "arn": f"arn:{world.partition}:iam::{world.account_id}:user/tfcheck",
        "user_id": "AIDATFCHECKEXAMPLE0000",
    }


def _region(config: dict[str, Any], world: World) -> dict[str, Any]:
    region = config.get("region") or config.get("name") or world.region
    return {
        "id": region,
        "name": region,
        "region": region,
        "description": f"AWS region {region}",
        "endpoint": f"ec2.{region}.amazonaws.com",
    }


def _partition(config: dict[str, Any], world: World) -> dict[str, Any]:
    return {
        "id": world.partition,
        "partition": world.partition,
        "dns_suffix": "amazonaws.com",
        "reverse_dns_prefix": "com.amazonaws",
    }


def _ssm_parameter(config: dict[str, Any], world: World) -> dict[str, Any]:
    name = config.get("name") or "tfcheck"
    is_image = "ami" in name.lower() or "image" in name.lower()
    value = example_ami_id(world.region, name) if is_image else "tfcheck-parameter-value"
    # Public parameters (/aws/service/...) belong to no account: their ARN has an empty account field.
    account = "" if name.startswith("/aws/service/") else None
    return {
        "id": name,
        "arn": world.arn("ssm", f"parameter/{name.lstrip('/')}", account=account),
        "type": "String",
        "value": value,
        "insecure_value": value,
        "version": 1,
    }


def _ami(config: dict[str, Any], world: World) -> dict[str, Any]:
    image_id = example_ami_id(world.region, "tfcheck-example-ami")
    return {
        "id": image_id,
        "image_id": image_id,
        "arn": world.arn("ec2", f"image/{image_id}", account=""),
        "architecture": "x86_64",
        "name": "tfcheck-example-ami",
        "root_device_name": "/dev/xvda",
        "root_device_type": "ebs",
        "virtualization_type": "hvm",
        "owner_id": world.account_id,
    }


# AWS-managed prefix lists are named com.amazonaws.<region>.<service>, and each region holds only its own
# (https://docs.aws.amazon.com/vpc/latest/userguide/working-with-aws-managed-prefix-lists.html).
_AWS_MANAGED_PREFIX_LIST = re.compile(r"com\.amazonaws\.(?P<region>[a-z0-9-]+)\.(?P<service>[a-z0-9.-]+)")


def _managed_prefix_list(config: dict[str, Any], world: World) -> dict[str, Any]:
    name = config.get("name") or next(
        (f["values"][0] for f in config.get("filter") or [] if f["name"] == "prefix-list-name"), None
    )
    name = name or f"com.amazonaws.{world.region}.s3"
    managed = _AWS_MANAGED_PREFIX_LIST.fullmatch(name)
    if managed and managed["region"] != world.region:
        # What AWS answers: no prefix list of that name in this region, so the read fails.
        raise NotFound(
            f"no EC2 managed prefix list named {name!r} in {world.region}; "
            f"AWS-managed ones there are named com.amazonaws.{world.region}.<service>"
        )
    list_id = config.get("id") or f"pl-{_stable_hex(world.region, name, length=8)}"
    owner = "AWS" if managed else world.account_id
    return {
        "id": list_id,
        "name": name,
        "arn": world.arn("ec2", f"prefix-list/{list_id}", account="aws" if managed else None),
        "address_family": "IPv4",
        "owner_id": owner,
        "max_entries": 0 if managed else 10,
        "version": 1,
    }


def _vpc(config: dict[str, Any], world: World) -> dict[str, Any]:
    vpc_id = config.get("id") or "vpc-0123456789abcdef0"
    return {
        "id": vpc_id,
        "arn": world.arn("ec2", f"vpc/{vpc_id}"),
        "cidr_block": "172.31.0.0/16",
        "owner_id": world.account_id,
        # As in a default VPC; a test overrides them to see a stack refuse a VPC without DNS.
        "enable_dns_support": True,
        "enable_dns_hostnames": True,
    }


def _subnets(config: dict[str, Any], world: World) -> dict[str, Any]:
    return {"id": world.region, "ids": [f"subnet-0123456789abcdef{index}" for index in range(3)]}


def _subnet(config: dict[str, Any], world: World) -> dict[str, Any]:
    subnet_id = config.get("id") or "subnet-0123456789abcdef0"
    return {
        "id": subnet_id,
        "arn": world.arn("ec2", f"subnet/{subnet_id}"),
        # Ids ending in consecutive characters land in distinct zones, as a stack's subnets spread over zones.
        "availability_zone": f"{world.region}{ZONE_LETTERS[ord(subnet_id[-1]) % len(ZONE_LETTERS)]}",
        "vpc_id": "vpc-0123456789abcdef0",
        "cidr_block": "172.31.0.0/20",
    }


def _ecr_repository(config: dict[str, Any], world: World) -> dict[str, Any]:
    name = config.get("name") or "tfcheck"
    return {
        "id": name,
        "arn": world.arn("ecr", f"repository/{name}"),
        "registry_id": world.account_id,
        "repository_url": f"{world.account_id}.dkr.ecr.{world.region}.amazonaws.com/{name}",
    }


def _ecr_image(config: dict[str, Any], world: World) -> dict[str, Any]:
    digest = "sha256:" + "0" * 64
    return {"id": digest, "image_digest": digest, "registry_id": world.account_id}


TYPE_DEFAULTS: dict[str, Callable[[dict[str, Any], World], dict[str, Any]]] = {
    "aws_ami": _ami,
    "aws_availability_zones": _availability_zones,
    "aws_caller_identity": _caller_identity,
    "aws_ecr_image": _ecr_image,
    "aws_ec2_managed_prefix_list": _managed_prefix_list,
    "aws_ecr_repository": _ecr_repository,
    "aws_iam_policy_document": _policy_document,
    "aws_partition": _partition,
    "aws_region": _region,
    "aws_ssm_parameter": _ssm_parameter,
    "aws_subnet": _subnet,
    "aws_subnets": _subnets,
    "aws_vpc": _vpc,
}


def placeholder(type_name: str, path: tuple[str, ...], cty_type: Any, world: World) -> Any:
    """A value of ``cty_type`` for a computed attribute nothing else gave a value."""
    if cty_type == "string":
        name = path[-1]
        if name == "arn" or name.endswith("_arn"):
            return world.arn(type_name.removeprefix("aws_").split("_")[0], f"tfcheck/{type_name}")
        return f"tfcheck-{name.replace('_', '-')}"
    if cty_type == "number":
        return 0
    if cty_type == "bool":
        return False
    if isinstance(cty_type, list):
        kind = cty_type[0]
        if kind in ("list", "set", "tuple"):
            return []
        if kind == "map":
            return {}
        if kind == "object":
            fields = cty_type[1].items()
            return {name: placeholder(type_name, (*path, name), inner, world) for name, inner in fields}
    return None


def read_data_source(
    type_name: str, block: Block, config: dict[str, Any], world: World, overrides: DataOverrides
) -> dict[str, Any]:
    """State for data source ``type_name`` read with ``config`` (a wholly known object)."""
    if isinstance(config.get("region"), str) and config["region"]:
        world = world.in_region(config["region"])
    defaults = TYPE_DEFAULTS[type_name](config, world) if type_name in TYPE_DEFAULTS else {}
    top_level = {**defaults, **overrides.get(type_name, {})}

    def filler(path: tuple[str, ...], attribute: dict[str, Any]) -> Any:
        if len(path) == 1 and path[0] in top_level:
            return top_level[path[0]]
        if path == ("region",):  # unset per-resource region: the provider's (the effective) region
            return world.region
        if "nested_type" in attribute:
            return None
        return placeholder(type_name, path, attribute["type"], world)

    return fill_computed(block, config, filler)
