"""The seeder instance: start it if stopped, wait for its SSM agent, stop it again. Bounded waits only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from sd_lambda.seeding.errors import SeedError, aws_error

NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})


@dataclass
class Seeder:
    ec2: Any
    ssm: Any
    instance_id: str
    poll_interval: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    log: Callable[[str], None] = field(default=print)

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
        while (state := self.state()) != wanted:
            if state in {"terminated", "shutting-down"} or self.clock() >= deadline:
                raise SeedError(f"seeder instance {self.instance_id} is {state}, not {wanted}, after waiting")
            self.sleep(self.poll_interval)

    def start_if_stopped(self, timeout: float = 300) -> bool:
        """Ask EC2 to start the instance unless it is running or starting; True if this call started it."""
        state = self.state()
        if state in {"running", "pending"}:
            return False
        if state in {"terminated", "shutting-down"}:
            raise SeedError(f"seeder instance {self.instance_id} is {state}: re-apply the stack")
        if state == "stopping":
            self._wait_state("stopped", timeout)
        self.log(f"starting seeder {self.instance_id}")
        try:
            self.ec2.start_instances(InstanceIds=[self.instance_id])
        except ClientError as exc:
            raise aws_error(exc, "ec2", self.instance_id) from exc
        return True

    def wait_running(self, timeout: float = 300) -> None:
        self._wait_state("running", timeout)

    def ensure_running(self, timeout: float = 300) -> bool:
        """Start the instance if needed and wait until it runs; True when this call started it."""
        started = self.start_if_stopped(timeout)
        self.wait_running(timeout)
        return started

    def wait_online(self, timeout: float = 600) -> None:
        """Until the SSM agent reports Online; a clear error after ``timeout`` seconds."""
        deadline = self.clock() + timeout
        status = "not registered"
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
                    "and the instance role's AmazonSSMManagedInstanceCore policy"
                )
            self.sleep(self.poll_interval)

    def stop(self) -> None:
        self.log(f"stopping seeder {self.instance_id}")
        try:
            self.ec2.stop_instances(InstanceIds=[self.instance_id])
        except ClientError as exc:
            raise aws_error(exc, "ec2", self.instance_id) from exc
