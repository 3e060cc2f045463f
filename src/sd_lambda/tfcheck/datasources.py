"""Plausible results for data sources, so offline plans see realistic values instead of nulls.

Every data source gets its configured values back; computed attributes the configuration left null
are filled from, in order: the caller's overrides for that type, a per-type default below, and a
placeholder of the right cty type. Defaults stay consistent with each other: the account, region and
partition a plan sees come from one :class:`World`, which overrides can change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sd_lambda.tfcheck.planning import fill_computed
from sd_lambda.tfcheck.schema import Block

DataOverrides = dict[str, dict[str, Any]]

EXAMPLE_AMI_ID = "ami-0123456789abcdef0"


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

    def arn(self, service: str, resource: str, *, regional: bool = True) -> str:
        region = self.region if regional else ""
        return f"arn:{self.partition}:{service}:{region}:{self.account_id}:{resource}"


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
    letters = "abc"
    return {
        "id": world.region,
        "names": [f"{world.region}{letter}" for letter in letters],
        "zone_ids": [f"{world.region}-az{index}" for index in range(1, len(letters) + 1)],
        "group_names": [world.region],
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
    value = EXAMPLE_AMI_ID if "ami" in name.lower() or "image" in name.lower() else "tfcheck-parameter-value"
    return {
        "id": name,
        "arn": world.arn("ssm", f"parameter/{name.lstrip('/')}"),
        "type": "String",
        "value": value,
        "insecure_value": value,
        "version": 1,
    }


def _ami(config: dict[str, Any], world: World) -> dict[str, Any]:
    return {
        "id": EXAMPLE_AMI_ID,
        "image_id": EXAMPLE_AMI_ID,
        "arn": world.arn("ec2", f"image/{EXAMPLE_AMI_ID}", regional=True),
        "architecture": "x86_64",
        "name": "tfcheck-example-ami",
        "root_device_name": "/dev/xvda",
        "root_device_type": "ebs",
        "virtualization_type": "hvm",
        "owner_id": world.account_id,
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
        "availability_zone": f"{world.region}{'abc'[ord(subnet_id[-1]) % 3]}",
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
    defaults = TYPE_DEFAULTS[type_name](config, world) if type_name in TYPE_DEFAULTS else {}
    top_level = {**defaults, **overrides.get(type_name, {})}

    def filler(path: tuple[str, ...], attribute: dict[str, Any]) -> Any:
        if len(path) == 1 and path[0] in top_level:
            return top_level[path[0]]
        if path == ("region",):  # the per-resource region override defaults to the provider's region
            return world.region
        if "nested_type" in attribute:
            return None
        return placeholder(type_name, path, attribute["type"], world)

    return fill_computed(block, config, filler)
