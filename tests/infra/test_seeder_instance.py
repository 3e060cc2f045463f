"""The seeder instance as Terraform would create it (a real offline plan of infra/, see tfcheck)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sd_lambda.devtools.tfcheck import plan

pytestmark = pytest.mark.slow

INFRA = Path(__file__).resolve().parents[2] / "infra"


@pytest.fixture(scope="module")
def seeder_instance() -> dict[str, Any]:
    document = plan(INFRA, {})
    (change,) = [c for c in document["resource_changes"] if c["type"] == "aws_instance"]
    return dict(change["change"]["after"])


def test_a_shutdown_from_the_os_stops_the_seeder(seeder_instance: dict[str, Any]) -> None:
    # The user data ends the first boot with `shutdown -h`: "terminate" would delete the seeder.
    assert seeder_instance["instance_initiated_shutdown_behavior"] == "stop"


def test_changed_user_data_replaces_the_seeder(seeder_instance: dict[str, Any]) -> None:
    # User data runs only at an instance's first boot: a changed script must come with a new instance.
    assert seeder_instance["user_data_replace_on_change"] is True
