"""Static shape of infra/: module files, no provider blocks, version constraints, documented variables.

The READMEs' generated inputs/outputs tables are checked with every other generated table
(tests/devtools/test_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions

from sd_lambda.devtools.tfcheck import validate

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
MODULES = sorted(p for p in (INFRA / "modules").iterdir() if p.is_dir())
EXAMPLES = sorted(p for p in (INFRA / "examples").iterdir() if p.is_dir())
# The root module's README (terraform-aws-modules style) carries its inputs/outputs table.
ROOT_README = REPO / "infra" / "README.md"
_OPTIONS = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)


def parse(directory: Path) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {}
    for path in sorted(directory.glob("*.tf")):
        with path.open() as handle:
            for kind, blocks in hcl2.load(handle, serialization_options=_OPTIONS).items():
                merged.setdefault(kind, []).extend(blocks)
    return merged


def named(blocks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name.strip('"'): body for block in blocks for name, body in block.items()}


def test_the_five_modules_exist() -> None:
    assert [m.name for m in MODULES] == ["efs", "lambda", "network", "seeder", "weights_bucket"]
    assert [e.name for e in EXAMPLES] == ["baked", "complete", "existing-vpc"]


@pytest.mark.parametrize("module", [INFRA, *MODULES], ids=lambda p: p.name)
def test_module_layout_and_constraints(module: Path) -> None:
    for name in ("main.tf", "variables.tf", "outputs.tf", "versions.tf"):
        assert (module / name).is_file(), f"{module.name}/{name} missing"
    config = parse(module)
    assert "provider" not in config, f"{module.name} declares a provider block"
    terraform = config["terraform"][0]
    assert terraform["required_version"] == ">= 1.6"
    aws = terraform["required_providers"][0]["aws"]
    assert aws["source"] == "hashicorp/aws"
    # Any 6.x floor (each module's own, checked against what it uses below), never 7.
    assert re.fullmatch(r">= 6\.\d+, < 7\.0", aws["version"]), aws["version"]


# Provider arguments this repository uses and the first hashicorp/aws release that has them (the provider's
# CHANGELOG): a module using one must not allow an older provider, or `terraform init` picks a release that
# rejects the argument at plan time.
PROVIDER_FEATURES: dict[tuple[str, str], tuple[int, int]] = {
    # CHANGELOG 6.28.0 (January 7, 2026): "resource/aws_lambda_permission: Add `invoked_via_function_url`
    # argument (#44858)".
    ("aws_lambda_permission", "invoked_via_function_url"): (6, 28),
}


def provider_floor(module: Path) -> tuple[int, int]:
    """The lowest hashicorp/aws ``major.minor`` this module's versions.tf allows."""
    version = parse(module)["terraform"][0]["required_providers"][0]["aws"]["version"]
    match = re.search(r">=\s*(\d+)\.(\d+)", version)
    assert match, f"{module.name}: no >= floor in {version!r}"
    return int(match[1]), int(match[2])


def provider_needed(module: Path) -> tuple[int, int]:
    """The lowest provider every resource in ``module`` and the local modules it calls can be planned with."""
    config = parse(module)
    needed = (6, 0)
    for block in config.get("resource", []):
        for type_name, instances in block.items():
            for body in instances.values():
                for (feature_type, argument), version in PROVIDER_FEATURES.items():
                    if type_name.strip('"') == feature_type and argument in body:
                        needed = max(needed, version)
    for call in named(config.get("module", [])).values():
        if str(call.get("source", "")).startswith("."):
            needed = max(needed, provider_needed((module / call["source"]).resolve()))
    return needed


@pytest.mark.parametrize("module", [INFRA, *MODULES, *EXAMPLES], ids=lambda p: p.name)
def test_no_versions_tf_allows_a_provider_older_than_its_module_uses(module: Path) -> None:
    needed = provider_needed(module)
    assert provider_floor(module) >= needed, (
        f"{module.name}/versions.tf allows hashicorp/aws {provider_floor(module)}, but the module (or a "
        f"module it calls) uses an argument added in {needed}"
    )


def test_the_lambda_module_needs_the_invoked_via_function_url_provider() -> None:
    # Guards the check above: it must see the argument where the stack uses it.
    assert provider_needed(INFRA / "modules" / "lambda") == (6, 28)
    assert provider_needed(INFRA) == (6, 28)
    assert provider_needed(INFRA / "examples" / "complete") == (6, 28)


@pytest.mark.parametrize("module", [INFRA, *MODULES, *EXAMPLES], ids=lambda p: p.name)
def test_every_variable_is_typed_and_described_and_every_output_described(module: Path) -> None:
    config = parse(module)
    for name, body in named(config.get("variable", [])).items():
        assert body.get("type"), f"{module.name}: variable {name} has no type"
        assert len(body.get("description", "")) > 10, f"{module.name}: variable {name} has no description"
    for name, body in named(config.get("output", [])).items():
        assert len(body.get("description", "")) > 5, f"{module.name}: output {name} has no description"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_have_a_provider_a_readme_and_call_the_root(example: Path) -> None:
    config = parse(example)
    assert "aws" in named(config["provider"])
    assert named(config["module"])["sd_lambda"]["source"] == "../.."
    assert (example / "README.md").read_text().startswith("# Example")


def test_tables_list_every_root_variable_with_its_default() -> None:
    readme = ROOT_README.read_text()
    for name in named(parse(INFRA)["variable"]):
        assert f"| `{name}` |" in readme
    assert "| `memory_size` | `number` | `10240` |" in readme
    assert "| `ssh_ingress_cidrs` | `list(string)` | `[]` |" in readme


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_each_module_validates_on_its_own(module: Path) -> None:
    """Every module is usable without the root stack (terraform-aws-modules style)."""
    result = validate(module)

    assert result.valid, [d.format(result.directory) for d in result.errors]
    assert [d.format(result.directory) for d in result.diagnostics] == []  # no warnings either


# weights_source is the root's own: it becomes the modules' toggles (efs count, efs_enabled, vpc_enabled).
ROOT_OWNED_VALIDATIONS = {"name", "region", "tags", "kms_key_arn", "weights_source"}
OUTPUT_NAME = re.compile(r"[a-z0-9]+(_[a-z0-9]+)+")


def test_reserved_concurrency_defaults_to_no_reservation() -> None:
    """Item 3: a new account cannot reserve concurrency (AWS keeps 100 unreserved), so null is the default.
    The deploy preflight reads this default from infra/variables.tf."""
    variable = named(parse(INFRA)["variable"])["reserved_concurrency"]
    assert variable["type"] == "number"
    assert variable["default"] is None
    assert "cost cap" in variable["description"]


def test_root_validates_only_what_it_owns_and_passes_the_rest_through() -> None:
    """Item 16: a value is validated once, in the module that uses it; duplicates at the root drifted."""
    variables = named(parse(INFRA)["variable"])
    validated_at_root = {name for name, body in variables.items() if body.get("validation")}
    assert validated_at_root == ROOT_OWNED_VALIDATIONS
    passed_through = set()
    for call in named(parse(INFRA)["module"]).values():
        module_variables = named(parse(INFRA / call["source"])["variable"])
        for argument, expression in call.items():
            match = re.fullmatch(r"\$\{var\.([a-z0-9_]+)\}", str(expression))
            if not match:
                continue
            passed_through.add(match.group(1))
            if match.group(1) in validated_at_root and argument != "name":
                assert not module_variables[argument].get("validation"), f"{argument} validated twice"
    assert {"memory_size", "ssh_ingress_cidrs", "vpc_cidr", "reserved_concurrency"} <= passed_through


@pytest.mark.parametrize("module", [INFRA, *MODULES], ids=lambda p: p.name)
def test_variables_with_a_default_are_not_nullable_unless_null_means_something(module: Path) -> None:
    """Item 16: a null for a value that means nothing as null becomes the default, not a later error."""
    for name, body in named(parse(module)["variable"]).items():
        if "default" in body and body["default"] is not None:
            assert body.get("nullable") is False, f"{module.name}: variable {name} should be nullable = false"


@pytest.mark.parametrize("module", [INFRA, *MODULES, *EXAMPLES], ids=lambda p: p.name)
def test_outputs_are_named_thing_attr(module: Path) -> None:
    names = set(named(parse(module).get("output", [])))
    assert {name for name in names if not OUTPUT_NAME.fullmatch(name)} <= {"region"}


def test_root_outputs_cover_what_a_consumer_needs() -> None:
    outputs = set(named(parse(INFRA)["output"]))
    assert {
        "function_arn",
        "function_name",
        "function_url",
        "function_role_arn",
        "seeder_role_arn",
        "seeder_instance_id",
        "weights_bucket_arn",
        "weights_bucket_name",
        "efs_file_system_id",
        "efs_file_system_arn",
        "efs_access_point_id",
        "efs_access_point_arn",
        "function_security_group_id",
        "efs_security_group_id",
        "seeder_security_group_id",
        "private_subnet_ids",
    } <= outputs


def test_root_exposes_tracing_log_level_retention_seeder_volume_and_zones() -> None:
    variables = named(parse(INFRA)["variable"])
    assert {
        "tracing_mode",
        "application_log_level",
        "log_retention_days",
        "seeder_root_volume_size",
        "availability_zones",
    } <= set(variables)
