"""Before touching EFS the program (re)starts the seeder's boot-setup unit when the mount is missing, and a
failed setup reaches the seeding driver as the unit's own one-line reason (the shipped zip, Python 3.9)."""

from __future__ import annotations

from pathlib import Path

from sd_lambda.seeding.efs_sync import MOUNT_UNIT
from sd_lambda.seeding.remote import Invocation

from .conftest import Bucket, SeederProgram, make_model

NAME = "acme--tiny-sd"
INSTALL_FAILED = "could not install amazon-efs-utils after 10 attempts: Curl error (28): Timeout was reached"


def _fake_tools(seeder: SeederProgram, tmp_path: Path, systemctl_exit: int) -> Path:
    """``systemctl`` and ``journalctl`` first on the program's PATH; returns the file their calls go to."""
    calls = tmp_path / "calls"
    calls.write_text("")
    bin_dir = Path(seeder.env["PATH"].split(":")[0])
    journal = f"Started sd-lambda mount\\nerror: {INSTALL_FAILED}\\n"
    tools = {"systemctl": f"exit {systemctl_exit}", "journalctl": f'printf "{journal}"'}
    for name, body in tools.items():
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n{body}\n')
        (bin_dir / name).chmod(0o755)
    return calls


def test_a_failed_setup_is_named_in_the_drivers_error(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    calls = _fake_tools(seeder, tmp_path, systemctl_exit=1)

    outcome = seeder.run("sync", NAME, "r1", "--require-mount", "--mount-wait", "0.2")

    assert outcome.returncode == 1
    assert calls.read_text().splitlines()[0] == f"systemctl start {MOUNT_UNIT}"
    assert list(seeder.mount.iterdir()) == []  # nothing written to the unmounted folder
    # What the driver makes of the command's output (SSM's StandardErrorContent).
    invocation = Invocation("c-1", "Failed", outcome.returncode, outcome.stdout, outcome.stderr)
    details = f"(details: journalctl -u {MOUNT_UNIT} on the seeder)"
    assert invocation.error_line() == f"EFS setup on the seeder failed: {INSTALL_FAILED} {details}"


def test_a_setup_that_leaves_no_mount_is_refused(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    calls = _fake_tools(seeder, tmp_path, systemctl_exit=0)

    outcome = seeder.run("rollback", NAME, "r1", "--require-mount", "--mount-wait", "0.2")

    assert outcome.returncode == 1
    assert calls.read_text().splitlines() == [f"systemctl start {MOUNT_UNIT}"]
    assert f"is not a mounted file system after waiting 0.2s (is EFS mounted? journalctl -u {MOUNT_UNIT}" in (
        outcome.stderr
    )
    assert list(seeder.mount.iterdir()) == []


def test_a_mounted_file_system_needs_no_setup(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    calls = _fake_tools(seeder, tmp_path, systemctl_exit=1)
    mount_point = Path("/")  # a mount point on every machine; the run stops at the missing model

    outcome = seeder.run("rollback", NAME, "r1", "--require-mount", "--mount", str(mount_point))

    assert calls.read_text() == ""
    assert outcome.returncode == 1
    assert f"no model '{NAME}' under /" in outcome.stderr
