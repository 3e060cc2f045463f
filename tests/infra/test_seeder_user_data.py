"""The seeder's user data, rendered by Terraform's own templatefile() and run as a shell script with fake
system tools (no root): the boot-setup unit it installs, the unit's script, and the first-boot stop, which
never cuts off a seed that reached the instance during the first boot (with the driver's mount check)."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from sd_lambda.ops.stack_outputs import StackTerraform
from sd_lambda.seeding.efs_sync import FIRST_BOOT_STOP, MOUNT_UNIT, SEED_MARKER
from sd_lambda.seeding.remote import mount_check_script

pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "modules" / "seeder" / "user_data.sh.tftpl"
SETUP_SCRIPT = "/usr/local/sbin/sd-lambda-efs-mount"
UNIT_FILE = f"/etc/systemd/system/{MOUNT_UNIT}"
MOUNT_OPTIONS = "_netdev,noresvport,tls,iam,accesspoint=fsap-0123456789abcdef0"


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


@dataclass
class Machine:
    """A temp root where the user data writes its files, and fake tools that log every call."""

    root: Path
    calls: Path

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def log(self, tool: str) -> list[str]:
        return [
            line.split(" ", 1)[1]
            for line in self.calls.read_text().splitlines()
            if line.startswith(tool + " ")
        ]

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script],
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": f"{self.root / 'fake-bin'}:/usr/bin:/bin"},
            timeout=60,
        )

    def run_setup_again(self) -> subprocess.CompletedProcess[str]:
        """What systemd does at every later boot, and the sync program through `systemctl start`."""
        return self.run(f"bash {self.path(SETUP_SCRIPT)}")


def _machine(
    tmp_path: Path,
    *,
    dnf_failures: int = 0,
    installed: bool = False,
    mounted: bool = False,
    seeding: bool = False,
) -> Machine:
    root = tmp_path / "machine"
    fake = root / "fake-bin"
    fake.mkdir(parents=True)
    for folder in (SETUP_SCRIPT, UNIT_FILE, SEED_MARKER, FIRST_BOOT_STOP):
        (root / folder.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    calls = root / "calls"
    calls.write_text("")
    dnf_count = root / "dnf-count"
    dnf_count.write_text("")
    setup = root / SETUP_SCRIPT.lstrip("/")
    tools = {
        "dnf": f'echo x >> {dnf_count}\nif [ "$(wc -l < {dnf_count})" -gt {dnf_failures} ]; then exit 0; fi\n'
        'echo "Curl error (28): Timeout was reached" >&2; exit 1',
        "rpm": f"exit {0 if installed else 1}",
        "sleep": "exit 0",  # the bounded waits, without waiting
        "mountpoint": f"exit {0 if mounted else 1}",
        "mount": "exit 0",
        # `systemctl start` of the oneshot unit runs its script, like systemd would.
        "systemctl": f'if [ "$1" = start ]; then exec bash {setup}; fi',
        "journalctl": "exit 0",
        "pgrep": f"exit {0 if seeding else 1}",
        "shutdown": "exit 0",
    }
    for name, body in tools.items():
        (fake / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {calls}\n{body}\n')
        (fake / name).chmod(0o755)
    return Machine(root, calls)


def _user_data_in(machine: Machine, rendered: str) -> str:
    script = rendered
    for absolute in (SETUP_SCRIPT, UNIT_FILE, "/mnt/models", SEED_MARKER, FIRST_BOOT_STOP):
        script = script.replace(absolute, str(machine.path(absolute)))
    return script


def test_is_valid_bash(rendered: str, tmp_path: Path) -> None:
    assert rendered.startswith("#!/bin/bash\n")
    script = tmp_path / "user_data.sh"
    script.write_text(rendered)

    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stderr


def test_installs_a_oneshot_unit_that_runs_at_every_boot(rendered: str, tmp_path: Path) -> None:
    machine = _machine(tmp_path)

    result = machine.run(_user_data_in(machine, rendered))

    assert result.returncode == 0, result.stderr
    unit = machine.path(UNIT_FILE).read_text()
    assert "\nType=oneshot\n" in unit
    assert "\nRemainAfterExit=yes\n" in unit  # a later `systemctl start` is a no-op once it succeeded
    assert f"\nExecStart={machine.path(SETUP_SCRIPT)}\n" in unit
    assert "\nWantedBy=multi-user.target\n" in unit
    assert "\nAfter=network-online.target\n" in unit
    assert re.search(r"\nTimeoutStartSec=\d+min\n", unit)
    systemctl = machine.log("systemctl")
    assert f"enable {MOUNT_UNIT}" in systemctl  # runs at every boot, not only this first one
    assert systemctl.index("daemon-reload") < systemctl.index(f"enable {MOUNT_UNIT}")
    assert f"start {MOUNT_UNIT}" in systemctl
    assert machine.log("mount") == [
        f"-t efs -o {MOUNT_OPTIONS} fs-0123456789abcdef0:/ {machine.path('/mnt/models')}"
    ]


def test_first_boot_stops_the_instance_when_done(rendered: str, tmp_path: Path) -> None:
    machine = _machine(tmp_path)

    result = machine.run(_user_data_in(machine, rendered))

    assert result.returncode == 0, result.stderr
    (shutdown,) = machine.log("shutdown")
    assert shutdown.startswith("-h ")  # halt: with instance_initiated_shutdown_behavior "stop", a stop
    assert machine.path(FIRST_BOOT_STOP).exists()  # what a mount check arriving meanwhile cancels


def test_first_boot_leaves_a_running_seed_alone(rendered: str, tmp_path: Path) -> None:
    machine = _machine(tmp_path, seeding=True)

    result = machine.run(_user_data_in(machine, rendered))

    assert result.returncode == 0, result.stderr
    assert machine.log("shutdown") == []
    assert "a seeding run is in progress" in result.stdout
    (pattern,) = machine.log("pgrep")
    # The pattern matches the command line remote.py runs, and not a mere mention of the program.
    regex = pattern.removeprefix("-f ")
    assert re.search(regex, "python3 /tmp/sd-lambda-efs-sync.Ab3dE6gH/efs-sync.pyz sync --mount /mnt/models")
    assert not re.search(regex, "aws s3 cp s3://b/models/.sd-lambda/efs-sync-0123.pyz /tmp/x")


def _mount_check_in(machine: Machine) -> str:
    """The driver's mount check (remote.py), as the seeder's sh runs it through SSM, on this machine."""
    script = "\n".join(mount_check_script("/mnt/models", 0))
    for absolute in ("/mnt/models", SEED_MARKER, FIRST_BOOT_STOP):
        script = script.replace(absolute, str(machine.path(absolute)))
    return script


def test_a_seed_that_reached_the_first_boot_is_not_stopped(rendered: str, tmp_path: Path) -> None:
    """The driver's mount check waited on the same unit as the user data, and the driver now downloads
    from the hub for minutes with no sync program running yet: the mount check's marker keeps the instance
    up (the driver stops it after the seed)."""
    machine = _machine(tmp_path, installed=True, mounted=True)
    mount_check = machine.run(_mount_check_in(machine))  # arrived during the boot, while the unit ran
    assert mount_check.returncode == 0, mount_check.stderr
    assert machine.path(SEED_MARKER).exists()
    assert machine.log("shutdown") == []  # nothing was pending: nothing to cancel

    result = machine.run(_user_data_in(machine, rendered))

    assert result.returncode == 0, result.stderr
    assert machine.log("shutdown") == []
    assert "a seeding run is in progress" in result.stdout
    assert not machine.path(FIRST_BOOT_STOP).exists()


def test_a_mount_check_after_the_first_boot_cancels_its_stop(rendered: str, tmp_path: Path) -> None:
    """A seed that arrives in the minute between the scheduled stop and the stop itself."""
    machine = _machine(tmp_path, installed=True, mounted=True)
    machine.run(_user_data_in(machine, rendered))
    assert [call.split(" ", 1)[0] for call in machine.log("shutdown")] == ["-h"]
    assert machine.path(FIRST_BOOT_STOP).exists()

    mount_check = machine.run(_mount_check_in(machine))

    assert mount_check.returncode == 0, mount_check.stderr
    assert machine.log("shutdown")[1:] == ["-c"]


def test_a_seed_arriving_while_the_stop_is_scheduled_is_seen(rendered: str, tmp_path: Path) -> None:
    """The mount check touches the marker just after the user data looked for it, and looks for the pending
    stop just before the user data marks it: the user data's second look cancels the stop."""
    machine = _machine(tmp_path, installed=True, mounted=True)
    shutdown = machine.root / "fake-bin" / "shutdown"
    shutdown.write_text(
        f'#!/bin/bash\necho "shutdown $*" >> {machine.calls}\n'
        f'if [ "$1" = -h ]; then touch {machine.path(SEED_MARKER)}; fi\n'
    )

    result = machine.run(_user_data_in(machine, rendered))

    assert result.returncode == 0, result.stderr
    assert [call.split(" ", 1)[0] for call in machine.log("shutdown")] == ["-h", "-c"]
    assert "stop cancelled" in result.stdout


def test_package_install_is_retried_while_the_network_settles(rendered: str, tmp_path: Path) -> None:
    machine = _machine(tmp_path, dnf_failures=3)

    result = machine.run(_user_data_in(machine, rendered))

    assert result.returncode == 0, result.stderr
    assert machine.log("dnf") == ["install -y amazon-efs-utils"] * 4
    assert len(machine.log("mount")) == 1


def test_a_failed_first_boot_recovers_at_the_next_start(rendered: str, tmp_path: Path) -> None:
    machine = _machine(tmp_path, dnf_failures=10)

    first_boot = machine.run(_user_data_in(machine, rendered))

    assert first_boot.returncode == 1
    assert len(machine.log("dnf")) == 10
    assert machine.log("mount") == []  # never got as far as mounting
    errors = [line for line in first_boot.stdout.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: could not install amazon-efs-utils after 10 attempts: Curl error (28): Timeout was reached"
    ]
    assert len(machine.log("shutdown")) == 1  # stopped anyway: a stopped instance costs nothing
    # The next start (the network has settled meanwhile): the same unit, run again, finishes the job.
    later_boot = machine.run_setup_again()
    assert later_boot.returncode == 0, later_boot.stdout
    assert len(machine.log("dnf")) == 11
    assert len(machine.log("mount")) == 1


def test_setup_is_a_no_op_when_already_done(rendered: str, tmp_path: Path) -> None:
    machine = _machine(tmp_path, installed=True, mounted=True)
    machine.run(_user_data_in(machine, rendered))
    machine.calls.write_text("")

    again = machine.run_setup_again()

    assert again.returncode == 0, again.stdout
    assert machine.log("dnf") == []
    assert machine.log("mount") == []


def test_a_mount_that_keeps_failing_says_so(rendered: str, tmp_path: Path) -> None:
    machine = _machine(tmp_path, installed=True)
    (machine.root / "fake-bin" / "mount").write_text(
        f'#!/bin/bash\necho "mount $*" >> {machine.calls}\n'
        'echo "Failed to resolve \\"fs-0123456789abcdef0.efs.us-east-1.amazonaws.com\\"" >&2; exit 32\n'
    )
    machine.run(_user_data_in(machine, rendered))
    machine.calls.write_text("")

    again = machine.run_setup_again()

    assert again.returncode == 1
    assert len(machine.log("mount")) == 60  # ten minutes of tries, 10 s apart
    (error,) = [line for line in again.stdout.splitlines() if line.startswith("error:")]
    assert error.startswith("error: could not mount fs-0123456789abcdef0 (fsap-0123456789abcdef0) at ")
    assert error.endswith('Failed to resolve "fs-0123456789abcdef0.efs.us-east-1.amazonaws.com"')
