"""Run the sync program on the seeder through SSM Run Command (``AWS-RunShellScript``), never SSH.

The command carries the program itself (zip application, base64) and its sha256, so the instance needs
nothing but ``python3``, ``base64`` and ``sha256sum`` (all on Amazon Linux 2023) and an S3 read role.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from sd_lambda.seeding.efs_sync import RESULT_PREFIX
from sd_lambda.seeding.errors import SeedError, aws_error
from sd_lambda.seeding.payload import program_bytes, program_sha256

DOCUMENT = "AWS-RunShellScript"
DELIVERY_TIMEOUT_S = 600  # SendCommand TimeoutSeconds: how long the command may wait for the agent
POLL_MARGIN_S = 120  # polling gives up this long after executionTimeout
TERMINAL = frozenset({"Success", "Failed", "Cancelled", "TimedOut", "Cancelling"})
TAIL_LINES = 15


def shell_script(argv: Sequence[str]) -> list[str]:
    """POSIX sh lines that unpack the program, check its sha256, and run ``python3 program ARGV``."""
    encoded = base64.b64encode(program_bytes()).decode()
    return [
        "set -eu",
        'program="$(mktemp /tmp/sd-lambda-efs-sync.XXXXXXXX)"',
        "trap 'rm -f \"$program\"' EXIT",
        f"printf '%s' '{encoded}' | base64 -d > \"$program\"",
        f"echo '{program_sha256()}  '\"$program\" | sha256sum -c --quiet -",
        'python3 "$program" ' + shlex.join(argv),
    ]


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
) -> Invocation:
    """Send ``commands`` and poll until they finish; raises SeedError if polling outlives the timeout."""
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
    deadline = clock() + DELIVERY_TIMEOUT_S + execution_timeout + POLL_MARGIN_S
    while True:
        try:
            invocation = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvocationDoesNotExist":
                raise aws_error(exc, "ssm", f"command {command_id}") from exc
            invocation = {"Status": "Pending"}
        status = str(invocation.get("Status"))
        if status in TERMINAL:
            return Invocation(
                command_id=command_id,
                status=status,
                exit_code=int(invocation.get("ResponseCode", -1)),
                stdout=str(invocation.get("StandardOutputContent", "")),
                stderr=str(invocation.get("StandardErrorContent", "")),
            )
        if clock() >= deadline:
            with contextlib.suppress(ClientError):  # best effort: the timeout is the error worth reporting
                ssm.cancel_command(CommandId=command_id, InstanceIds=[instance_id])
            raise SeedError(
                f"command {command_id} on {instance_id} still {status} after "
                f"{execution_timeout}s (executionTimeout); cancelled it"
            )
        sleep(poll_interval)
