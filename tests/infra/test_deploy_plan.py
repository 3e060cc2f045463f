"""The deploy driver's addresses and data-loss check against offline plans of the real stack: the root
(infra/) and the complete example, which calls it as a module (every address gains a prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sd_lambda.devtools.tfcheck.runner import plan
from sd_lambda.ops import deploy
from sd_lambda.ops.plan_guard import PROTECTED_TYPES, data_loss

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
# Where the stack keeps its data, as the root stack names it.
DATA_ADDRESSES = (
    "module.efs[0].aws_efs_file_system.this",
    "module.efs[0].aws_efs_access_point.this",
    "module.weights_bucket.aws_s3_bucket.this[0]",
    "aws_kms_key.this[0]",
    "module.lambda.aws_ecr_repository.this",
)


def destroyed(document: dict[str, Any]) -> dict[str, Any]:
    """The same plan, with every resource it creates replaced instead."""
    return {
        "resource_changes": [
            {**change, "change": {**change["change"], "actions": ["delete", "create"]}}
            for change in document["resource_changes"]
        ]
    }


@pytest.fixture(scope="module")
def root_plan() -> dict[str, Any]:
    return plan(INFRA, {}, var_files=[REPO / "tests" / "infra" / "offline.tfvars"])


@pytest.mark.slow
def test_stage_one_targets_and_the_function_are_real_addresses(root_plan: dict[str, Any]) -> None:
    addresses = {change["address"] for change in root_plan["resource_changes"]}

    assert set(deploy.REGISTRY_TARGETS) <= addresses
    assert deploy.FUNCTION_ADDRESS in addresses


@pytest.mark.slow
def test_replacing_the_root_stack_names_every_data_resource(root_plan: dict[str, Any]) -> None:
    losses = data_loss(destroyed(root_plan))

    assert [address for address in DATA_ADDRESSES if f"replace {address} (" in "; ".join(losses)] == list(
        DATA_ADDRESSES
    )
    assert {loss.split()[1].rsplit(".", 2)[-2] for loss in losses} == set(PROTECTED_TYPES)


@pytest.mark.slow
def test_the_stack_called_as_a_module_is_protected_too() -> None:
    example = INFRA / "examples" / "complete"
    document = plan(example, {}, var_files=[REPO / "tests" / "infra" / "examples" / "complete.tfvars"])

    losses = "; ".join(data_loss(destroyed(document)))

    for address in DATA_ADDRESSES:
        assert f".{address} (" in losses, address
        assert f"replace {address} (" not in losses  # only ever with the caller's module prefix
