"""The seeder's user data, rendered by Terraform's own templatefile() and checked as a shell script."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sd_lambda.stack_outputs import StackTerraform

pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "modules" / "seeder" / "user_data.sh.tftpl"


@pytest.fixture
def rendered(terraform_on_path: Path, tmp_path: Path) -> str:
    stack = tmp_path / "render"
    stack.mkdir()
    variables = {
        "file_system_id": "fs-0123456789abcdef0",
        "access_point_id": "fsap-0123456789abcdef0",
        "mount_path": "/mnt/models",
    }
    # Terraform accepts JSON syntax in *.tf.json: no HCL quoting to get wrong.
    expression = f"${{templatefile({json.dumps(str(TEMPLATE))}, {json.dumps(variables)})}}"
    (stack / "main.tf.json").write_text(json.dumps({"output": {"user_data": {"value": expression}}}))
    terraform = StackTerraform(stack)
    terraform.init()
    terraform.apply({})
    return terraform.outputs()["user_data"]


def test_mounts_the_access_point_with_tls_and_iam_at_the_fixed_path(rendered: str) -> None:
    assert rendered.startswith("#!/bin/bash\n")
    assert "dnf install -y amazon-efs-utils" in rendered
    fstab = (
        "fs-0123456789abcdef0:/ /mnt/models efs "
        "_netdev,noresvport,tls,iam,accesspoint=fsap-0123456789abcdef0 0 0"
    )
    assert fstab in rendered
    assert "mount /mnt/models" in rendered


def test_is_valid_bash(rendered: str, tmp_path: Path) -> None:
    script = tmp_path / "user_data.sh"
    script.write_text(rendered)

    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stderr


def _run_with_fake_tools(
    rendered: str, tmp_path: Path, dnf_failures: int
) -> tuple[subprocess.CompletedProcess, int]:
    """Run the script with dnf failing ``dnf_failures`` times, and fake sleep/mount tools (no root)."""
    fake = tmp_path / "fake-tools"
    fake.mkdir()
    attempts = tmp_path / "dnf-attempts"
    attempts.write_text("")
    tools = {
        "dnf": f'echo x >> {attempts}\n[ "$(wc -l < {attempts})" -gt {dnf_failures} ]',
        "sleep": "exit 0",  # the bounded waits, without waiting
        "mountpoint": "exit 0",
        "mount": "exit 0",
    }
    for name, body in tools.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    mount_path = tmp_path / "mnt"
    script = tmp_path / "user_data.sh"
    script.write_text(
        rendered.replace("/etc/fstab", str(tmp_path / "fstab")).replace("/mnt/models", str(mount_path))
    )
    (tmp_path / "fstab").write_text("")
    result = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": f"{fake}:/usr/bin:/bin"},
        timeout=60,
    )
    return result, len(attempts.read_text().splitlines())


def test_package_install_is_retried_while_the_network_settles(rendered: str, tmp_path: Path) -> None:
    result, attempts = _run_with_fake_tools(rendered, tmp_path, dnf_failures=3)

    assert result.returncode == 0, result.stderr
    assert attempts == 4
    assert "accesspoint=fsap-0123456789abcdef0" in (tmp_path / "fstab").read_text()


def test_package_install_gives_up_after_ten_attempts(rendered: str, tmp_path: Path) -> None:
    result, attempts = _run_with_fake_tools(rendered, tmp_path, dnf_failures=100)

    assert result.returncode == 1
    assert attempts == 10
    assert "could not install amazon-efs-utils after 10 attempts" in result.stderr
    assert (tmp_path / "fstab").read_text() == ""  # never got as far as mounting
