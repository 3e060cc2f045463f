"""The stub's pieces on their own: cty wire values, schema messages, planning, data source defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from tf.gen import tfplugin_pb2 as pb

from sd_lambda.devtools.tfcheck import cty
from sd_lambda.devtools.tfcheck.datasources import World, read_data_source, render_policy_document
from sd_lambda.devtools.tfcheck.planning import ProviderSettings, conform, plan_change
from sd_lambda.devtools.tfcheck.schema import SchemaError, block_to_pb, load_schema, to_response


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def test_unknown_values_round_trip_byte_for_byte() -> None:
    refined = msgpack.ExtType(12, b"\x81\x01\xc3")  # "unknown, but not null"
    wire = msgpack.packb({"a": msgpack.ExtType(0, b"\x00"), "b": refined, "c": [1, "x", None]})
    value = cty.decode(wire)
    assert value["a"] == cty.UNKNOWN
    assert value["b"] == cty.Unknown(refined)
    assert not cty.is_known(value)
    assert cty.is_known(value["c"])
    assert cty.encode(value) == wire


def test_unexpected_extension_types_are_rejected() -> None:
    with pytest.raises(ValueError, match="extension type 5"):
        cty.decode(msgpack.packb(msgpack.ExtType(5, b"")))


def test_schema_messages_keep_nesting_limits_and_types(schema) -> None:
    response = to_response(schema)
    access_point = response.resource_schemas["aws_efs_access_point"].block
    root_directory = next(b for b in access_point.block_types if b.type_name == "root_directory")
    assert root_directory.nesting == pb.Schema.NestedBlock.LIST
    assert root_directory.max_items == 1
    creation_info = next(b for b in root_directory.block.block_types if b.type_name == "creation_info")
    assert {a.name: a.required for a in creation_info.block.attributes}["permissions"] is True
    tags = next(a for a in access_point.attributes if a.name == "tags")
    assert json.loads(tags.type) == ["map", "string"]
    assert len(response.resource_schemas) > 1600
    assert "aws_iam_policy_document" in response.data_source_schemas
    provider_blocks = {b.type_name for b in response.provider.block.block_types}
    assert {"default_tags", "assume_role", "ignore_tags"} <= provider_blocks


def test_nested_type_attributes_become_schema_objects() -> None:
    block = {
        "attributes": {
            "rules": {
                "optional": True,
                "nested_type": {
                    "nesting_mode": "list",
                    "attributes": {"port": {"type": "number", "required": True}},
                    "max_items": 3,
                },
            }
        }
    }
    (attribute,) = block_to_pb(block).attributes
    assert attribute.nested_type.nesting == pb.Schema.Object.LIST
    assert attribute.nested_type.max_items == 3
    assert attribute.nested_type.attributes[0].name == "port"
    assert attribute.type == b""


def test_missing_or_malformed_schema_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="not found"):
        load_schema(tmp_path / "absent.json.gz")
    (tmp_path / "bad.json").write_text('{"format_version": "1.0"}')
    with pytest.raises(SchemaError, match="providers schema -json"):
        load_schema(tmp_path / "bad.json")


def test_plan_change_marks_unset_computed_attributes_unknown_on_create(schema) -> None:
    block = schema.resource_block("aws_efs_access_point")
    proposed = {name: None for name in block["attributes"]}
    proposed |= {
        "file_system_id": "fs-1",
        "tags": {"Name": "models"},
        "posix_user": [],
        "root_directory": [{"path": None, "creation_info": []}],
    }
    settings = ProviderSettings(region="eu-west-1", default_tags={"Project": "p", "Name": "default"})
    planned = plan_change(block, None, proposed, proposed, settings)
    assert planned["arn"] == cty.UNKNOWN
    assert planned["id"] == cty.UNKNOWN
    assert planned["file_system_id"] == "fs-1"
    assert planned["tags_all"] == {"Project": "p", "Name": "models"}
    assert planned["region"] == "eu-west-1"
    assert planned["root_directory"][0]["path"] == cty.UNKNOWN  # optional + computed, left unset


def test_tags_all_stays_unknown_when_tags_are_unknown(schema) -> None:
    block = schema.resource_block("aws_efs_file_system")
    proposed = {name: None for name in block["attributes"]} | {"tags": cty.UNKNOWN}
    planned = plan_change(block, None, proposed, proposed, ProviderSettings(default_tags={"a": "b"}))
    assert planned["tags_all"] == cty.UNKNOWN


def test_provider_settings_read_default_tags() -> None:
    settings = ProviderSettings.from_config({"region": "us-west-2", "default_tags": [{"tags": {"A": "1"}}]})
    assert settings == ProviderSettings(region="us-west-2", default_tags={"A": "1"})


def test_conform_fills_missing_attributes_and_blocks(schema) -> None:
    block = schema.resource_block("aws_efs_access_point")
    state = conform(block, {"id": "fsap-1", "file_system_id": "fs-1", "obsolete": 1})
    assert state["id"] == "fsap-1"
    assert state["arn"] is None
    assert state["posix_user"] == []
    assert "obsolete" not in state


def test_policy_document_rendering() -> None:
    document = render_policy_document(
        {
            "source_policy_documents": [
                json.dumps({"Statement": [{"Sid": "Read", "Effect": "Allow", "Action": "s3:GetObject"}]})
            ],
            "statement": [
                {
                    "sid": "Read",
                    "effect": None,
                    "actions": ["s3:ListBucket", "s3:GetObject"],
                    "resources": ["arn:aws:s3:::b", "arn:aws:s3:::b/*"],
                    "principals": [{"type": "*", "identifiers": ["*"]}],
                    "condition": [{"test": "Bool", "variable": "aws:SecureTransport", "values": ["true"]}],
                }
            ],
        }
    )
    assert document == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Read",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": ["arn:aws:s3:::b", "arn:aws:s3:::b/*"],
                "Principal": "*",
                "Condition": {"Bool": {"aws:SecureTransport": "true"}},
            }
        ],
    }


def test_data_source_defaults_overrides_and_placeholders(schema) -> None:
    world = World.from_overrides("ap-south-1", {"aws_caller_identity": {"account_id": "999988887777"}})
    identity_block = schema.data_source_block("aws_caller_identity")
    identity = read_data_source(
        "aws_caller_identity", identity_block, dict.fromkeys(identity_block["attributes"]), world, {}
    )
    assert identity["account_id"] == "999988887777"
    assert identity["arn"] == "arn:aws:iam::999988887777:user/tfcheck"

    parameter_block = schema.data_source_block("aws_ssm_parameter")
    config = dict.fromkeys(parameter_block["attributes"]) | {"name": "/sd/model"}
    overrides = {"aws_ssm_parameter": {"value": "segmind--tiny-sd"}}
    parameter = read_data_source("aws_ssm_parameter", parameter_block, config, world, overrides)
    assert parameter["value"] == "segmind--tiny-sd"
    assert parameter["name"] == "/sd/model"

    vpc_block = schema.data_source_block("aws_vpc_endpoint_service")  # no per-type default: placeholders
    endpoint = read_data_source(
        "aws_vpc_endpoint_service", vpc_block, dict.fromkeys(vpc_block["attributes"]), world, {}
    )
    assert endpoint["region"] == "ap-south-1"
    assert isinstance(endpoint["service_name"], str)
    assert endpoint["availability_zones"] == []
    assert endpoint["arn"].startswith("arn:aws:")


def test_provider_refuses_to_run_outside_terraform() -> None:
    environment = {k: v for k, v in os.environ.items() if k != "TF_PLUGIN_MAGIC_COOKIE"}
    completed = subprocess.run(
        [sys.executable, "-m", "sd_lambda.devtools.tfcheck.provider"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 1
    assert "Terraform starts it" in completed.stderr
    assert completed.stdout == ""
