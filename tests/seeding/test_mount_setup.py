"""Before touching EFS the program (re)starts the seeder's boot-setup unit when the mount is missing, and a
failed setup reaches the seeding driver as the unit's own one-line reason (the shipped zip, Python 3.9).
On the seeder it first cancels a stop the first boot may have scheduled."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_lambda.seeding.efs_sync import MOUNT_UNIT
from sd_lambda.seeding.remote import Invocation

from .conftest import Bucket, SeederProgram, make_model

NAME = "acme--tiny-sd"
INSTALL_FAILED = "could not install amazon-efs-utils after 10 attempts: Curl error (28): Timeout was reached"


def _fake_tools(seeder: SeederProgram, tmp_path: Path, systemctl_exit: int, shutdown: str = "exit 0") -> Path:
    """``systemctl``, ``journalctl`` and ``shutdown`` first on the program's PATH; returns the file their
    calls go to."""
    calls = tmp_path / "calls"
    calls.write_text("")
    bin_dir = Path(seeder.env["PATH"].split(":")[0])
    journal = f"Started sd-lambda mount\\nerror: {INSTALL_FAILED}\\n"
    tools = {"systemctl": f"exit {systemctl_exit}", "journalctl": f'printf "{journal}"', "shutdown": shutdown}
    for name, body in tools.items():
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n{body}\n')
        (bin_dir / name).chmod(0o755)
    return calls


def _without_shutdown(calls: Path) -> list[str]:
    return [line for line in calls.read_text().splitlines() if not line.startswith("shutdown ")]


def test_a_failed_setup_is_named_in_the_drivers_error(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    calls = _fake_tools(seeder, tmp_path, systemctl_exit=1)

    outcome = seeder.run("sync", NAME, "r1", "--require-mount", "--mount-wait", "0.2")

    assert outcome.returncode == 1
    assert _without_shutdown(calls)[0] == f"systemctl start {MOUNT_UNIT}"
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
    assert _without_shutdown(calls) == [f"systemctl start {MOUNT_UNIT}"]
    assert f"is not a mounted file system after waiting 0.2s (is EFS mounted? journalctl -u {MOUNT_UNIT}" in (
        outcome.stderr
    )
    assert list(seeder.mount.iterdir()) == []


def test_a_mounted_file_system_needs_no_setup(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    calls = _fake_tools(seeder, tmp_path, systemctl_exit=1)
    mount_point = Path("/")  # a mount point on every machine; the run stops at the missing model

    outcome = seeder.run("rollback", NAME, "r1", "--require-mount", "--mount", str(mount_point))

    assert _without_shutdown(calls) == []
    assert outcome.returncode == 1
    assert f"no model '{NAME}' under /" in outcome.stderr


@pytest.mark.parametrize("command", ["sync", "rollback"])
def test_a_run_on_the_seeder_first_cancels_a_pending_stop(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path, command: str
) -> None:
    """The first boot's `shutdown -h +1` must not cut off a run that arrived in its last minute."""
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    calls = _fake_tools(seeder, tmp_path, systemctl_exit=1)

    outcome = seeder.run(command, NAME, "r1", "--require-mount", "--mount-wait", "0.2")

    assert outcome.returncode == 1  # the (fake) setup failed: the run stops there
    # Cancelled first, before the wait on the mount, which can take minutes on a first boot.
    assert calls.read_text().splitlines()[:2] == ["shutdown -c", f"systemctl start {MOUNT_UNIT}"]


def test_no_pending_shutdown_is_no_error(seeder: SeederProgram, tmp_path: Path) -> None:
    # What `shutdown -c` may say on a boot with no stop pending (or without logind) changes nothing.
    calls = _fake_tools(seeder, tmp_path, systemctl_exit=1, shutdown='echo "No pending shutdown" >&2; exit 1')

    outcome = seeder.run("rollback", NAME, "r1", "--require-mount", "--mount", "/")

    assert calls.read_text().splitlines() == ["shutdown -c"]
    assert outcome.returncode == 1
    assert [line for line in outcome.stderr.splitlines() if line.startswith("error:")] == [
        f"error: no model '{NAME}' under /"
    ]


def test_a_run_off_the_seeder_never_calls_shutdown(seeder: SeederProgram, tmp_path: Path) -> None:
    # Local runs and tests: the machine they run on is nobody's seeder.
    calls = _fake_tools(seeder, tmp_path, systemctl_exit=1)

    seeder.run("rollback", NAME, "r1")
    seeder.run("rollback", NAME, "r1", "--require-mount", "--mount", "/", "--mount-unit", "none")

    assert calls.read_text() == ""
