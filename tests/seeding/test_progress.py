"""The driver's long waits print a plain progress line on stderr about every 15 s (a fake clock here)."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError
from helpers import FakeClock

from sd_lambda.cli import main
from sd_lambda.seeding import flow
from sd_lambda.seeding.payload import ShippedProgram
from sd_lambda.seeding.progress import EVERY_S, Ticker, describe_sync
from sd_lambda.seeding.remote import (
    DOCUMENT,
    PROBE_DELIVERY_TIMEOUT_S,
    PROBE_EXECUTION_TIMEOUT_S,
    Invocation,
    run_command,
    sync_probe,
)
from sd_lambda.seeding.seeder import Seeder
from sd_lambda.seeding.target import Target


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
    monkeypatch.setattr(
        flow, "rollback", lambda clients, target, name, revision, options, adapter=None: dict(answer)
    )
    stack = ["--bucket", "b", "--instance-id", "i-1", "--region", "eu-west-1"]

    assert main(["rollback", "--name", "m", "--revision", "r1", *stack, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {**answer, "current": "r1"}

    assert main(["rollback", "--name", "m", "--revision", "r1", *stack]) == 0
    assert capsys.readouterr().out == "m: current -> r1 (was r2); releases: r1, r2\n"


# --- the sync's progress on the seeder, read by probes while the sync runs ----------------------------

PROGRESS_FILE = "/run/sd-lambda-sync/0123456789abcdef0123456789abcdef.json"


def _state(bytes_done: int, files_done: int, phase: str = "downloading") -> str:
    return json.dumps(
        {
            "phase": phase,
            "bytes_done": bytes_done,
            "bytes_total": 4_300_000_000,
            "files_done": files_done,
            "files_total": 37,
        }
    )


class ProbedSsm:
    """The sync command (``c-1``) answers ``statuses`` in turn; every probe sent after it (``p-1``, ...)
    answers from ``probe_answers`` in turn, one answer per GetCommandInvocation; ``"Pending"`` keeps
    that probe unanswered. Refuses a probe sent while another one is unanswered."""

    def __init__(self, statuses: list[str], probe_answers: list[tuple[str, str]]) -> None:
        self.statuses, self.probe_answers = statuses, probe_answers
        self.probes: list[dict[str, Any]] = []
        self.unanswered: str | None = None
        self.fail_sends = False

    def send_command(self, **kwargs: Any) -> dict[str, Any]:
        if kwargs["Comment"] != "sd-lambda progress":
            return {"Command": {"CommandId": "c-1"}}
        assert self.unanswered is None, "a probe sent while the previous one was unanswered"
        if self.fail_sends:
            raise ClientError(
                {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "SendCommand"
            )
        self.probes.append(kwargs)
        self.unanswered = f"p-{len(self.probes)}"
        return {"Command": {"CommandId": self.unanswered}}

    def get_command_invocation(self, CommandId: str, InstanceId: str) -> dict[str, Any]:
        if CommandId == "c-1":
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            return {"Status": status, "ResponseCode": 0, "StandardOutputContent": "RESULT {}"}
        assert CommandId == self.unanswered
        status, stdout = self.probe_answers.pop(0) if len(self.probe_answers) > 1 else self.probe_answers[0]
        if status != "Pending":
            self.unanswered = None
        return {"Status": status, "StandardOutputContent": stdout}

    def get_paginator(self, name: str) -> Any:
        """ListCommands, as the stop rule reads it: every probe and the sync still unfinished."""
        commands = [
            {"CommandId": f"p-{n + 1}", "InstanceIds": ["i-1"], "Status": "InProgress"}
            for n in range(len(self.probes))
        ]
        commands.append({"CommandId": "c-1", "InstanceIds": ["i-1"], "Status": "InProgress"})
        return SimpleNamespace(paginate=lambda Filters: [{"Commands": commands}])


def _sync(ssm: ProbedSsm, sent: set[str]) -> tuple[Invocation, list[str], FakeClock]:
    clock, heard = FakeClock(), []
    invocation = run_command(
        ssm,
        "i-1",
        ["true"],
        execution_timeout=600,
        comment="sd-lambda seed m@r1",
        sleep=clock.sleep,
        clock=clock,
        sent=sent,
        log=heard.append,
        probe=sync_probe(PROGRESS_FILE),
    )
    return invocation, heard, clock


def test_the_sync_reports_bytes_and_files_done_while_it_runs() -> None:
    """Polls every 5 s, InProgress from t = 5: the first probe goes once the sync has run 15 s (t = 20)
    and answers at t = 25; the second goes at t = 35 and answers only at t = 55, so none goes at t = 50,
    when one is due; the third goes at t = 55 and answers at t = 60."""
    ssm = ProbedSsm(
        ["Pending", *["InProgress"] * 13, "Success"],
        [
            ("Success", _state(1_200_000_000, 12)),
            ("Pending", ""),
            ("Pending", ""),
            ("Pending", ""),
            ("Success", _state(2_600_000_000, 20)),
            ("Success", _state(4_300_000_000, 37, "verifying and switching")),
        ],
    )
    sent: set[str] = set()
    invocation, heard, clock = _sync(ssm, sent)
    assert invocation.status == "Success"
    assert heard == [
        "  command c-1 on i-1: Pending (0 s)",
        "  command c-1 on i-1: InProgress (15 s)",
        "  sync: 1.2/4.3 GB, 12/37 files, downloading (30 s)",
        "  sync: 1.2/4.3 GB, 12/37 files, downloading (45 s)",
        "  sync: 4.3/4.3 GB, 37/37 files, verifying and switching (60 s)",
    ]
    assert clock.now == 70
    assert len(ssm.probes) == 3  # one at a time: none while the second was unanswered
    for probe in ssm.probes:  # short, read-only, bounded
        assert probe["InstanceIds"] == ["i-1"]
        assert probe["DocumentName"] == DOCUMENT
        assert probe["Parameters"] == {
            "commands": ["cat -- " + shlex.quote(PROGRESS_FILE)],
            "executionTimeout": [str(PROBE_EXECUTION_TIMEOUT_S)],
        }
        assert probe["TimeoutSeconds"] == PROBE_DELIVERY_TIMEOUT_S == 30  # SendCommand's smallest
    assert PROBE_EXECUTION_TIMEOUT_S <= 10
    # The stop rule never waits for this run's own probes (nor its own sync), still unfinished or not.
    assert sent == {"c-1", "p-1", "p-2", "p-3"}
    assert Seeder(None, ssm, "i-1", sent=sent).unfinished_commands() == []
    assert Seeder(None, ssm, "i-1", sent={"c-1"}).unfinished_commands() == ["p-1", "p-2", "p-3"]


@pytest.mark.parametrize(
    "answer",
    [
        ("Failed", ""),  # no progress file yet (cat: No such file)
        ("Success", ""),
        ("Success", "not json"),
        ("Success", json.dumps({"phase": "downloading", "bytes_done": "12"})),
        ("TimedOut", ""),
        "send refused",
    ],
)
def test_a_probe_that_fails_says_nothing_and_the_sync_goes_on(answer: Any) -> None:
    ssm = ProbedSsm(
        ["Pending", *["InProgress"] * 10, "Success"], [answer if answer != "send refused" else ("Failed", "")]
    )
    ssm.fail_sends = answer == "send refused"
    invocation, heard, _ = _sync(ssm, set())
    assert invocation.status == "Success"
    assert heard == [
        f"  command c-1 on i-1: {status} ({t} s)"
        for status, t in [("Pending", 0), *[("InProgress", t) for t in (15, 30, 45)]]
    ]
    assert len(ssm.probes) == (0 if answer == "send refused" else 3)  # t = 20, 35, 50


def test_a_later_failed_probe_drops_the_last_progress_line() -> None:
    """A stale line would say the sync is where it was a minute ago: the status comes back instead."""
    ssm = ProbedSsm(
        ["Pending", *["InProgress"] * 10, "Success"], [("Success", _state(1_200_000_000, 12)), ("Failed", "")]
    )
    _, heard, _ = _sync(ssm, set())
    assert heard[2:] == [
        "  sync: 1.2/4.3 GB, 12/37 files, downloading (30 s)",
        "  command c-1 on i-1: InProgress (45 s)",
    ]


def test_progress_lines_name_the_unit_that_suits_the_size() -> None:
    def line(done: int, total: int, files: int = 3) -> str | None:
        return describe_sync(
            json.dumps(
                {
                    "phase": "downloading",
                    "bytes_done": done,
                    "bytes_total": total,
                    "files_done": 1,
                    "files_total": files,
                }
            )
        )

    assert line(1_200_000_000, 4_300_000_000) == "sync: 1.2/4.3 GB, 1/3 files, downloading"
    assert line(12_500_000, 340_000_000) == "sync: 12.5/340.0 MB, 1/3 files, downloading"
    assert line(500, 900) == "sync: 500/900 bytes, 1/3 files, downloading"
    assert line(0, 0, files=0) == "sync: downloading"  # the manifest is not read yet
    assert describe_sync("[1, 2]") is None
    assert (
        describe_sync(
            json.dumps({"phase": "x", "bytes_done": -1, "bytes_total": 0, "files_done": 0, "files_total": 1})
        )
        is None
    )


def test_the_seed_probes_the_progress_file_its_sync_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: dict[str, Any] = {}

    def run_command(ssm: Any, instance_id: str, commands: list[str], **kwargs: Any) -> Invocation:
        sent.update(commands=commands, probe=kwargs["probe"])
        return Invocation("c-1", "Success", 0, 'RESULT {"downloaded_bytes": 0}', "")

    monkeypatch.setattr(flow, "run_command", run_command)
    seeder = SimpleNamespace(state=lambda: "running", sent=set())
    run = flow.SeederRun(seeder, ShippedProgram("weights", "models/.sd-lambda/p.pyz", "0" * 64, False))  # type: ignore[arg-type]
    target = Target(bucket="weights", instance_id="i-1", region="eu-west-1")
    staged = flow.S3Release("weights", "models/m/r1/", "m", "r1", "1" * 64)
    flow.sync_on_seeder(SimpleNamespace(ssm=None), target, staged, flow.RunOptions(), run)  # type: ignore[arg-type]
    argv = shlex.split(sent["commands"][-1])
    written = argv[argv.index("--progress-file") + 1]
    assert written.startswith("/run/sd-lambda-sync/")
    assert sent["probe"].commands == ["cat -- " + shlex.quote(written)]
    assert sent["probe"].describe is describe_sync
