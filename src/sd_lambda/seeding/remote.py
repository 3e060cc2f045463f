"""Run the sync program on the seeder through SSM Run Command (``AWS-RunShellScript``), never SSH.

The command is a short POSIX sh script: fetch the program from S3 with the AWS CLI (where the driver put
it, see ``sd_lambda.seeding.payload``), check its sha256, run it with ``python3``. The instance needs
only what Amazon Linux 2023 ships (``aws``, ``sha256sum``, ``python3``) and its S3 read role.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from sd_lambda.seeding.efs_sync import MOUNT_UNIT, PROGRESS_DIR, RESULT_PREFIX
from sd_lambda.seeding.errors import SeedError, aws_error
from sd_lambda.seeding.payload import ShippedProgram
from sd_lambda.seeding.progress import EVERY_S, Ticker, describe_sync

DOCUMENT = "AWS-RunShellScript"
DELIVERY_TIMEOUT_S = 600  # SendCommand TimeoutSeconds: how long the command may wait for the agent
POLL_MARGIN_S = 120  # polling gives up this long after executionTimeout
# The command statuses that are final (the Status of GetCommandInvocation and of ListCommands' commands).
# Every other one (Pending, InProgress, Delayed, Cancelling, and any AWS adds) is a command that still
# runs, or may yet run, on its instance: the poll below waits on it and the seeder's stop rule counts it
# (https://docs.aws.amazon.com/systems-manager/latest/userguide/monitor-commands.html: Success, Failed,
# Cancelled and the timeouts are "a terminal state"; Delayed is retried; Cancelling is not final,
# https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_GetCommandInvocation.html).
FINISHED = frozenset({"Success", "Failed", "Cancelled", "TimedOut"})
TAIL_LINES = 15
# A probe (see Probe) waits at most SendCommand's smallest TimeoutSeconds for the agent, then runs at most
# a few seconds: a wedged instance never collects probes.
PROBE_DELIVERY_TIMEOUT_S = 30
PROBE_EXECUTION_TIMEOUT_S = 5


def shell_script(program: ShippedProgram, argv: Sequence[str], region: str | None) -> list[str]:
    """POSIX sh lines that fetch the program, check its sha256, and run ``python3 program ARGV``."""
    fetch = ["aws", "s3", "cp", program.url, "--only-show-errors", *(["--region", region] if region else [])]

    def fail(message: str) -> str:  # the driver reports the last ``error:`` line
        return f"{{ echo {shlex.quote('error: ' + message)} >&2; exit 1; }}"

    return [
        "set -eu",
        # A private folder (0700): nothing else on the instance can swap the program after the check.
        'work="$(mktemp -d /tmp/sd-lambda-efs-sync.XXXXXXXX)"',
        "trap 'rm -rf \"$work\"' EXIT",
        'program="$work/efs-sync.pyz"',
        f'{shlex.join(fetch[:4])} "$program" {shlex.join(fetch[4:])} || '
        + fail(f"cannot fetch the sync program {program.url} (the seeder role needs s3:GetObject on it)"),
        f"echo '{program.sha256}  '\"$program\" | sha256sum -c --quiet - || "
        + fail(f"{program.url} is not the program this driver shipped (sha256 mismatch); nothing ran"),
        'python3 "$program" ' + shlex.join(argv),
    ]


def mount_check_script(mount_path: str, wait_s: int, unit: str = MOUNT_UNIT) -> list[str]:
    """POSIX sh lines that succeed once EFS is mounted at ``mount_path``: as the sync program does, the
    seeder's boot-setup unit is started when it is not (``systemctl start`` of a oneshot unit returns when
    the unit has finished, which it bounds itself), then the mount is awaited up to ``wait_s`` seconds.
    A failed setup ends with the unit's own last ``error:`` line. ``mountpoint`` is util-linux, in every
    Amazon Linux 2023 image."""
    mount, unit_q = shlex.quote(mount_path), shlex.quote(unit)
    journal = f"journalctl --unit {unit_q} --boot --output cat --no-pager --lines 50 2>/dev/null"
    setup_failed = (
        f'reason="$({journal} | sed -n "s/^error: *//p" | tail -n 1)"; '
        f'echo "error: EFS setup on the seeder failed: ${{reason:-{unit} failed}} '
        f'(details: journalctl -u {unit} on the seeder)" >&2; exit 1'
    )
    not_mounted = (
        f"error: EFS is not mounted at {mount_path} after {wait_s}s (journalctl -u {unit} on the seeder)"
    )
    return [
        "set -u",
        "touch /run/sd-lambda-seeding 2>/dev/null && [ -e /run/sd-lambda-stop-pending ] && shutdown -c",
        f"mountpoint -q {mount} || systemctl start {unit_q} || {{ {setup_failed}; }}",
        "waited=0",
        f"until mountpoint -q {mount}; do",
        f'  [ "$waited" -lt {int(wait_s)} ] || {{ echo {shlex.quote(not_mounted)} >&2; exit 1; }}',
        "  sleep 5; waited=$((waited + 5))",
        "done",
        f"echo {shlex.quote('mounted: ' + mount_path)}",
    ]


@dataclass(frozen=True)
class Probe:
    """A short read-only command sent beside a long one while it runs, and the progress line its output
    makes (None: nothing worth saying). GetCommandInvocation returns a command's output only once the
    command has ended ("StandardOutputContent ... If the command hasn't finished, this is empty",
    https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_GetCommandInvocation.html), so a
    command that takes minutes can only tell how far it got through another command."""

    commands: list[str]
    describe: Callable[[str], str | None]
    comment: str = "sd-lambda progress"


def progress_file() -> str:
    """A progress file of its own for one sync on the seeder (``efs_sync --progress-file``)."""
    return f"{PROGRESS_DIR}/{uuid.uuid4().hex}.json"


def sync_probe(path: str) -> Probe:
    """Reads the sync's progress file (written whole by a rename, so never half of it)."""
    return Probe(["cat -- " + shlex.quote(path)], describe_sync)


@dataclass
class _Prober:
    """Sends ``probe`` once the command has been InProgress for ``EVERY_S`` seconds and then every
    ``EVERY_S`` seconds, one at a time (none while the last one is unanswered). A probe that fails, or any
    error around it, is skipped: it never fails the command it watches."""

    ssm: Any
    instance_id: str
    probe: Probe
    clock: Callable[[], float]
    sent: set[str] | None
    latest: str | None = field(default=None, init=False)
    _pending: str | None = field(default=None, init=False)
    _last: float | None = field(default=None, init=False)
    _running_since: float | None = field(default=None, init=False)

    def __call__(self, status: str) -> str | None:
        """After a poll of the watched command: the newest progress line, if any."""
        if self._pending is not None:
            self._collect(self._pending)
        now = self.clock()
        if status != "InProgress":
            return self.latest
        if self._running_since is None:
            self._running_since = now
        due = (self._last if self._last is not None else self._running_since) + EVERY_S
        if self._pending is None and now >= due:
            self._last = now
            self._send()
        return self.latest

    def _send(self) -> None:
        with contextlib.suppress(ClientError, BotoCoreError):
            self._pending = self.ssm.send_command(
                InstanceIds=[self.instance_id],
                DocumentName=DOCUMENT,
                Comment=self.probe.comment[:100],
                TimeoutSeconds=PROBE_DELIVERY_TIMEOUT_S,
                Parameters={
                    "commands": self.probe.commands,
                    "executionTimeout": [str(PROBE_EXECUTION_TIMEOUT_S)],
                },
            )["Command"]["CommandId"]
            if self.sent is not None:  # the stop rule must not wait for this run's own probes
                self.sent.add(self._pending)

    def _collect(self, command_id: str) -> None:
        try:
            answer = self.ssm.get_command_invocation(CommandId=command_id, InstanceId=self.instance_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvocationDoesNotExist":
                self._pending = None  # not yet known to SSM is asked again; anything else is given up
            return
        except BotoCoreError:
            self._pending = None
            return
        status = answer.get("Status")
        if status not in FINISHED:
            return
        self._pending = None
        output = str(answer.get("StandardOutputContent", "")) if status == "Success" else ""
        self.latest = self.probe.describe(output)


@dataclass(frozen=True)
class Invocation:
    command_id: str
    status: str
    exit_code: int
    stdout: str
    stderr: str

    def result(self) -> dict[str, Any]:
        """The program's ``RESULT {json}`` line."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(RESULT_PREFIX):
                return dict(json.loads(line[len(RESULT_PREFIX) :]))
        raise SeedError(f"command {self.command_id} succeeded but printed no result: {self.stdout[-200:]!r}")

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        return (self.stderr.strip() or self.stdout.strip()).splitlines()[-lines:]

    def error_line(self) -> str:
        errors = [line for line in self.tail() if line.startswith("error:")]
        return errors[-1][len("error:") :].strip() if errors else (self.tail(1) or [self.status])[0]


def run_command(
    ssm: Any,
    instance_id: str,
    commands: list[str],
    *,
    execution_timeout: int,
    comment: str,
    poll_interval: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    sent: set[str] | None = None,
    log: Callable[[str], None] | None = None,
    probe: Probe | None = None,
) -> Invocation:
    """Send ``commands`` and poll until they finish; raises SeedError if polling outlives the timeout.

    The command's id goes into ``sent`` as soon as it exists, and so does every probe's: the seeder's stop
    rule must not take this run's own commands, one still cancelling after a timeout or a Ctrl-C, for
    another run's. Interrupted (Ctrl-C) while polling, the command is cancelled before the interrupt goes
    on. ``log`` hears about every 15 s while the command runs: ``probe``'s newest line when there is one,
    else the command's status."""
    try:
        command_id = ssm.send_command(
            InstanceIds=[instance_id],
            DocumentName=DOCUMENT,
            Comment=comment[:100],
            TimeoutSeconds=DELIVERY_TIMEOUT_S,
            Parameters={"commands": commands, "executionTimeout": [str(execution_timeout)]},
        )["Command"]["CommandId"]
    except ClientError as exc:
        raise aws_error(exc, "ssm", f"{instance_id} with document {DOCUMENT}") from exc
    if sent is not None:
        sent.add(command_id)
    try:
        progress = Ticker(log or (lambda _: None), clock)
        prober = _Prober(ssm, instance_id, probe, clock, sent) if probe is not None else None
        return _poll(
            ssm, instance_id, command_id, execution_timeout, poll_interval, sleep, clock, progress, prober
        )
    except KeyboardInterrupt:
        # Left alone, the sync would run on for up to its executionTimeout with nobody waiting for it.
        _cancel(ssm, instance_id, command_id)
        raise


def _cancel(ssm: Any, instance_id: str, command_id: str) -> None:
    """Best effort: the timeout or the interrupt is what the operator needs to hear about. AWS does not
    promise a cancel stops the process either ("no guarantee that the command will be terminated",
    https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_CancelCommand.html): the stop rule,
    which ignores this run's own commands, stops the seeder under it."""
    with contextlib.suppress(ClientError, BotoCoreError):
        ssm.cancel_command(CommandId=command_id, InstanceIds=[instance_id])


def _poll(
    ssm: Any,
    instance_id: str,
    command_id: str,
    execution_timeout: int,
    poll_interval: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    progress: Ticker,
    prober: _Prober | None = None,
) -> Invocation:
    deadline = clock() + DELIVERY_TIMEOUT_S + execution_timeout + POLL_MARGIN_S
    while True:
        try:
            invocation = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvocationDoesNotExist":
                raise aws_error(exc, "ssm", f"command {command_id}") from exc
            invocation = {"Status": "Pending"}
        status = str(invocation.get("Status"))
        if status in FINISHED:
            return Invocation(
                command_id=command_id,
                status=status,
                exit_code=int(invocation.get("ResponseCode", -1)),
                stdout=str(invocation.get("StandardOutputContent", "")),
                stderr=str(invocation.get("StandardErrorContent", "")),
            )
        if clock() >= deadline:
            _cancel(ssm, instance_id, command_id)
            raise SeedError(
                f"command {command_id} on {instance_id} still {status} after "
                f"{execution_timeout}s (executionTimeout); cancelled it"
            )
        line = prober(status) if prober is not None else None
        progress(f"  {line}" if line else f"  command {command_id} on {instance_id}: {status}")
        sleep(poll_interval)
