"""The driver's long waits print a plain progress line on stderr about every 15 s (a fake clock here)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sd_lambda.cli import main
from sd_lambda.seeding import flow
from sd_lambda.seeding.progress import EVERY_S, Ticker
from sd_lambda.seeding.remote import run_command
from sd_lambda.seeding.seeder import Seeder


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeEc2:
    """``describe_instances`` answers the given states in turn, then the last one forever."""

    def __init__(self, *states: str) -> None:
        self.states = list(states)

    def describe_instances(self, InstanceIds: list[str]) -> dict[str, Any]:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"Reservations": [{"Instances": [{"State": {"Name": state}}]}]}


class FakeSsm:
    def __init__(self, pings: list[str], statuses: list[str]) -> None:
        self.pings, self.statuses = pings, statuses

    def describe_instance_information(self, Filters: list[Any]) -> dict[str, Any]:
        status = self.pings.pop(0) if len(self.pings) > 1 else self.pings[0]
        return {"InstanceInformationList": [{"PingStatus": status}]}

    def send_command(self, **_: Any) -> dict[str, Any]:
        return {"Command": {"CommandId": "c-1"}}

    def get_command_invocation(self, **_: Any) -> dict[str, Any]:
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"Status": status, "ResponseCode": 0, "StandardOutputContent": "RESULT {}"}


def test_the_ticker_speaks_first_and_then_once_per_interval() -> None:
    clock, heard = FakeClock(), []
    tick = Ticker(heard.append, clock)
    for _ in range(12):  # 60 s of 5 s polls
        tick("waiting")
        clock.sleep(5)
    assert heard == ["waiting (0 s)", "waiting (15 s)", "waiting (30 s)", "waiting (45 s)"]


def test_the_seeder_start_and_agent_waits_report_their_state() -> None:
    clock, heard = FakeClock(), []
    seeder = Seeder(
        FakeEc2(*["pending"] * 8, "running"),
        FakeSsm(["ConnectionLost"] * 5 + ["Online"], ["Success"]),
        "i-1",
        sleep=clock.sleep,
        clock=clock,
        log=heard.append,
    )
    seeder.wait_ready(start_timeout=300, online_timeout=600)
    assert heard == [
        "seeder i-1 is pending, waiting until it is running (0 s)",
        "seeder i-1 is pending, waiting until it is running (15 s)",
        "seeder i-1 is pending, waiting until it is running (30 s)",
        "seeder i-1: SSM agent ConnectionLost, waiting until it is Online (0 s)",
        "seeder i-1: SSM agent ConnectionLost, waiting until it is Online (15 s)",
    ]


def test_the_command_on_the_seeder_reports_its_status_while_it_runs() -> None:
    clock, heard = FakeClock(), []
    ssm = FakeSsm(["Online"], ["Pending", *["InProgress"] * 6, "Success"])
    invocation = run_command(
        ssm,
        "i-1",
        ["true"],
        execution_timeout=60,
        comment="c",
        sleep=clock.sleep,
        clock=clock,
        log=heard.append,
    )
    assert invocation.status == "Success"
    assert heard == [
        "  command c-1 on i-1: Pending (0 s)",
        "  command c-1 on i-1: InProgress (15 s)",
        "  command c-1 on i-1: InProgress (30 s)",
    ]
    assert EVERY_S == 15


def test_rollback_json_is_one_document(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(flow.AwsClients, "create", lambda region: None)
    answer = {"model": "m", "revision": "r1", "previous": "r2", "releases": ["r1", "r2"]}
    monkeypatch.setattr(flow, "rollback", lambda clients, target, name, revision, options: dict(answer))
    stack = ["--bucket", "b", "--instance-id", "i-1", "--region", "eu-west-1"]

    assert main(["rollback", "--name", "m", "--revision", "r1", *stack, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {**answer, "current": "r1"}

    assert main(["rollback", "--name", "m", "--revision", "r1", *stack]) == 0
    assert capsys.readouterr().out == "m: current -> r1 (was r2); releases: r1, r2\n"
