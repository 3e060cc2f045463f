"""The aws provider schema: loaded from ``terraform providers schema -json`` output, served as tfplugin6.

The JSON form (``block`` / ``attributes`` / ``block_types`` / ``nesting_mode``) is kept as plain dicts:
planning walks it directly, and :func:`to_response` turns it into the protobuf messages Terraform reads.
The published schema file has no provider-block schema, so ``provider_config_schema.json`` beside this
module supplies a hand-written one (see its ``_source`` note).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tf.gen import tfplugin_pb2 as pb

PROVIDER_ADDRESS = "registry.terraform.io/hashicorp/aws"
SCHEMA_FILE_NAME = "aws-provider-schema-6.47.0.json.gz"
# Editable install: the repository's copy of the published schema (tests/data/, with its source note).
DEFAULT_SCHEMA_PATH = Path(__file__).resolve().parents[4] / "tests" / "data" / SCHEMA_FILE_NAME
_PROVIDER_CONFIG_SCHEMA = Path(__file__).with_name("provider_config_schema.json")

Block = dict[str, Any]

_BLOCK_NESTING = {
    "single": pb.Schema.NestedBlock.SINGLE,
    "list": pb.Schema.NestedBlock.LIST,
    "set": pb.Schema.NestedBlock.SET,
    "map": pb.Schema.NestedBlock.MAP,
    "group": pb.Schema.NestedBlock.GROUP,
}
_OBJECT_NESTING = {
    "single": pb.Schema.Object.SINGLE,
    "list": pb.Schema.Object.LIST,
    "set": pb.Schema.Object.SET,
    "map": pb.Schema.Object.MAP,
}


class SchemaError(Exception):
    """The schema file is missing or not in ``terraform providers schema -json`` format."""


@dataclass(frozen=True)
class ProviderSchema:
    provider: dict[str, Any]
    resources: dict[str, dict[str, Any]]
    data_sources: dict[str, dict[str, Any]]

    def resource_block(self, type_name: str) -> Block:
        return self.resources[type_name]["block"]

    def data_source_block(self, type_name: str) -> Block:
        return self.data_sources[type_name]["block"]


def load_schema(path: Path = DEFAULT_SCHEMA_PATH) -> ProviderSchema:
    """Read the (optionally gzipped) provider schema JSON."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SchemaError(f"aws provider schema not found at {path}: {exc.strerror}") from exc
    try:
        document = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        aws = document["provider_schemas"][PROVIDER_ADDRESS]
        resources, data_sources = aws["resource_schemas"], aws["data_source_schemas"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SchemaError(f"{path} is not `terraform providers schema -json` output for aws: {exc}") from exc
    provider = aws.get("provider") or json.loads(_PROVIDER_CONFIG_SCHEMA.read_text())
    return ProviderSchema(provider=provider, resources=resources, data_sources=data_sources)


def _attribute_to_pb(name: str, attribute: dict[str, Any]) -> pb.Schema.Attribute:
    message = pb.Schema.Attribute(
        name=name,
        required=attribute.get("required", False),
        optional=attribute.get("optional", False),
        computed=attribute.get("computed", False),
        sensitive=attribute.get("sensitive", False),
        deprecated=attribute.get("deprecated", False),
        description_kind=pb.PLAIN,
    )
    if "nested_type" in attribute:
        nested = attribute["nested_type"]
        message.nested_type.CopyFrom(
            pb.Schema.Object(
                attributes=[_attribute_to_pb(n, a) for n, a in sorted(nested["attributes"].items())],
                nesting=_OBJECT_NESTING[nested["nesting_mode"]],
                min_items=nested.get("min_items", 0),
                max_items=nested.get("max_items", 0),
            )
        )
    else:
        # cty type JSON, exactly as Terraform itself serialises types.
        message.type = json.dumps(attribute["type"], separators=(",", ":")).encode()
    return message


def block_to_pb(block: Block) -> pb.Schema.Block:
    return pb.Schema.Block(
        attributes=[_attribute_to_pb(n, a) for n, a in sorted(block.get("attributes", {}).items())],
        block_types=[
            pb.Schema.NestedBlock(
                type_name=name,
                block=block_to_pb(nested["block"]),
                nesting=_BLOCK_NESTING[nested["nesting_mode"]],
                min_items=nested.get("min_items", 0),
                max_items=nested.get("max_items", 0),
            )
            for name, nested in sorted(block.get("block_types", {}).items())
        ],
        deprecated=block.get("deprecated", False),
        description_kind=pb.PLAIN,
    )


def _schema_to_pb(schema: dict[str, Any]) -> pb.Schema:
    return pb.Schema(version=schema.get("version", 0), block=block_to_pb(schema["block"]))


def to_response(schema: ProviderSchema) -> pb.GetProviderSchema.Response:
    return pb.GetProviderSchema.Response(
        provider=_schema_to_pb(schema.provider),
        provider_meta=pb.Schema(block=pb.Schema.Block()),
        resource_schemas={name: _schema_to_pb(s) for name, s in schema.resources.items()},
        data_source_schemas={name: _schema_to_pb(s) for name, s in schema.data_sources.items()},
        server_capabilities=pb.ServerCapabilities(plan_destroy=True),
    )
