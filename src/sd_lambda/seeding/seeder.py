"""The seeder instance: start it if stopped, wait for its SSM agent, stop it again. Bounded waits only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from sd_lambda.seeding.errors import SeedError, aws_error
from sd_lambda.seeding.progress import Ticker
from sd_lambda.seeding.remote import FINISHED

NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
# Older commands are finished: a command waits for delivery at most TimeoutSeconds (the driver's: 600 s)
# plus its executionTimeout, then runs at most its executionTimeout, which AWS-RunShellScript caps at
# 172800 s (monitor-commands.html above, "Delivery Timed Out").
LOOKBACK = timedelta(seconds=600 + 2 * 172800)


@dataclass
class Seeder:
    ec2: Any
    ssm: Any
    instance_id: str
    poll_interval: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    log: Callable[[str], None] = field(default=print)
    # Ids of the commands this run sent to the instance (``remote.run_command(sent=...)``): the stop rule
    # waits for other runs' commands, never for this run's own, which may still be Cancelling after a
    # timeout or a Ctrl-C.
    sent: set[str] = field(default_factory=set)

    def state(self) -> str:
        try:
            reservations = self.ec2.describe_instances(InstanceIds=[self.instance_id])["Reservations"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in NOT_FOUND_CODES:
                raise SeedError(
                    f"seeder instance {self.instance_id} not found (stale stack outputs? pass --instance-id)"
                ) from exc
            raise aws_error(exc, "ec2", self.instance_id) from exc
        instances = [i for r in reservations for i in r["Instances"]]
        if not instances:
            raise SeedError(f"seeder instance {self.instance_id} not found")
        return str(instances[0]["State"]["Name"])

    def _wait_state(self, wanted: str, timeout: float) -> None:
        deadline = self.clock() + timeout
        progress = Ticker(self.log, self.clock)
        while (state := self.state()) != wanted:
            if state in {"terminated", "shutting-down"} or self.clock() >= deadline:
                raise SeedError(f"seeder instance {self.instance_id} is {state}, not {wanted}, after waiting")
            progress(f"seeder {self.instance_id} is {state}, waiting until it is {wanted}")
            self.sleep(self.poll_interval)

    def start_if_stopped(self, timeout: float = 300) -> None:
        """Ask EC2 to start the instance unless it is running or starting."""
        state = self.state()
        if state in {"running", "pending"}:
            return
        if state in {"terminated", "shutting-down"}:
            raise SeedError(f"seeder instance {self.instance_id} is {state}: re-apply the stack")
        if state == "stopping":
            self._wait_state("stopped", timeout)
        self.log(f"starting seeder {self.instance_id}")
        try:
            self.ec2.start_instances(InstanceIds=[self.instance_id])
        except ClientError as exc:
            raise aws_error(exc, "ec2", self.instance_id) from exc

    def wait_ready(self, start_timeout: float = 300, online_timeout: float = 600) -> None:
        """After :meth:`start_if_stopped`: running, with its SSM agent Online."""
        self._wait_state("running", start_timeout)
        self.wait_online(online_timeout)

    def wait_online(self, timeout: float = 600) -> None:
        """Until the SSM agent reports Online; a clear error after ``timeout`` seconds."""
        deadline = self.clock() + timeout
        status = "not registered"
        progress = Ticker(self.log, self.clock)
        while True:
            try:
                found = self.ssm.describe_instance_information(
                    Filters=[{"Key": "InstanceIds", "Values": [self.instance_id]}]
                )["InstanceInformationList"]
            except ClientError as exc:
                raise aws_error(exc, "ssm", self.instance_id) from exc
            if found:
                status = str(found[0].get("PingStatus"))
                if status == "Online":
                    return
            if self.clock() >= deadline:
                raise SeedError(
                    f"the SSM agent on {self.instance_id} is not Online after {timeout:.0f}s "
                    f"(status: {status}): check the ssm/ssmmessages/ec2messages VPC endpoints "
                    "and that the instance role's inline policy allows the agent's actions "
                    "(ssm:UpdateInstanceInformation, ec2messages:*, ssmmessages:*)"
                )
            progress(f"seeder {self.instance_id}: SSM agent {status}, waiting until it is Online")
            self.sleep(self.poll_interval)

    def unfinished_commands(self, now: datetime | None = None) -> list[str]:
        """Ids of Run Command commands sent to this instance that are not finished yet: another seeding
        run's sync or rollback (or anything else someone runs on it); never one this run sent.

        ListCommands is asked without InstanceId and filtered here: AWS documents that a command still
        Pending cannot be listed by instance ID (it has not reached the node), and a Pending command is
        exactly another run that is about to need the instance
        (https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_ListCommands.html,
        https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_CommandFilter.html).
        """
        since = (now or datetime.now(UTC)) - LOOKBACK
        filters = [{"key": "InvokedAfter", "value": since.strftime("%Y-%m-%dT%H:%M:%SZ")}]
        try:
            pages = self.ssm.get_paginator("list_commands").paginate(Filters=filters)
            return [
                str(command["CommandId"])
                for page in pages
                for command in page.get("Commands", [])
                if self.instance_id in command.get("InstanceIds", [])
                and command.get("Status") not in FINISHED
                and command["CommandId"] not in self.sent
            ]
        except ClientError as exc:
            raise aws_error(exc, "ssm", self.instance_id) from exc

    def stop_unless_busy(self, now: datetime | None = None) -> None:
        """Stop the instance unless another run's command is still unfinished on it (the last run out
        stops it)."""
        busy = self.unfinished_commands(now)
        if busy:
            self.log(
                f"seeder {self.instance_id} left running: command {', '.join(busy)} still runs on it "
                "(the run that sent it stops the seeder when it ends)"
            )
            return
        self.stop()

    def stop(self) -> None:
        self.log(f"stopping seeder {self.instance_id}")
        try:
            self.ec2.stop_instances(InstanceIds=[self.instance_id])
        except ClientError as exc:
            raise aws_error(exc, "ec2", self.instance_id) from exc
