"""The seeder is stopped when nothing runs on it (#21 item 10): after every run, unless ``--keep-running`` or
another command is still unfinished on the instance; the last run out stops it, also one that found it
running, and a run whose seeder was stopped by another one meanwhile starts it again."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from sd_lambda.seeding import flow
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.seeder import LOOKBACK, Seeder
from sd_lambda.seeding.target import Target

from .conftest import REGION, make_model
from .test_driver import NAME, FakeClock, _instance, _state

NOW = datetime(2026, 12, 4, 22, 0, 0, tzinfo=UTC)
OTHER_RUN = "11111111-2222-4333-8444-555555555555"


class Agent:
    """moto's SSM for what it does; the Stubber'd client for the agent's answers and the command list
    (moto reports every command Success at once, so it cannot show another run's command in progress)."""

    STUBBED = frozenset({"describe_instance_information", "get_command_invocation", "get_paginator"})

    def __init__(self, moto_ssm: Any) -> None:
        self.moto_ssm = moto_ssm
        self.client = boto3.client("ssm", region_name=REGION)
        self.stub = Stubber(self.client)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client if name in self.STUBBED else self.moto_ssm, name)

    def online(self, instance_id: str) -> None:
        found = [{"InstanceId": instance_id, "PingStatus": "Online"}]
        self.stub.add_response("describe_instance_information", {"InstanceInformationList": found})

    def invocation(self, stdout: str) -> None:
        response = {"Status": "Success", "ResponseCode": 0, "StandardOutputContent": stdout}
        self.stub.add_response("get_command_invocation", response)

    def a_run(self, instance_id: str, restarted: bool = False) -> None:
        """What one rollback hears from the agent: Online, mount check done, its result; Online once more
        before the result when the seeder had to be started again (``restarted``)."""
        self.online(instance_id)
        self.invocation("mounted: /mnt/models")
        if restarted:
            self.online(instance_id)
        self.invocation("RESULT {}")

    def commands(self, *commands: dict[str, Any]) -> None:
        """ListCommands' one page, as the driver asks for it: recent commands, any instance, any status."""
        filters = {"Filters": [{"key": "InvokedAfter", "value": ANY}]}
        self.stub.add_response("list_commands", {"Commands": list(commands)}, filters)


def _command(command_id: str, instance_id: str, status: str) -> dict[str, Any]:
    return {"CommandId": command_id, "InstanceIds": [instance_id], "Status": status}


@pytest.fixture
def aws(aws_env: dict[str, str]) -> Iterator[flow.AwsClients]:
    with mock_aws():
        yield flow.AwsClients.create(REGION)


@pytest.fixture
def agent(aws: flow.AwsClients) -> Agent:
    return Agent(aws.ssm)


def _clients(aws: flow.AwsClients, agent: Agent) -> flow.AwsClients:
    return flow.AwsClients(aws.s3, aws.ec2, agent)


def _target(aws: flow.AwsClients, instance_id: str) -> Target:
    aws.s3.create_bucket(Bucket="weights")
    return Target(bucket="weights", instance_id=instance_id, region=REGION)


def _options(**changes: Any) -> flow.RunOptions:
    clock = FakeClock()
    return flow.RunOptions(sleep=clock.sleep, clock=clock, **changes)


def test_unfinished_commands_are_this_instances_pending_and_running_ones() -> None:
    ssm = boto3.client("ssm", region_name=REGION)
    seeder = Seeder(None, ssm, "i-1")
    since = (NOW - LOOKBACK).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert since == "2026-11-30T21:50:00Z"  # 4 days and 600 s: the longest a command can stay unfinished
    expected = {"Filters": [{"key": "InvokedAfter", "value": since}]}
    ids = {
        name: f"{index:08d}-2222-4333-8444-555555555555"
        for index, name in enumerate(("running", "elsewhere", "done", "failed", "queued", "cancelling"))
    }
    with Stubber(ssm) as stub:
        first = [
            _command(ids["running"], "i-1", "InProgress"),
            _command(ids["elsewhere"], "i-2", "InProgress"),
            _command(ids["done"], "i-1", "Success"),
            _command(ids["failed"], "i-1", "Failed"),
        ]
        stub.add_response("list_commands", {"Commands": first, "NextToken": "t"}, expected)
        second = [_command(ids["queued"], "i-1", "Pending"), _command(ids["cancelling"], "i-1", "Cancelling")]
        stub.add_response("list_commands", {"Commands": second}, {**expected, "NextToken": "t"})
        assert seeder.unfinished_commands(NOW) == [ids["running"], ids["queued"], ids["cancelling"]]
        stub.assert_no_pending_responses()


def test_overlapping_runs_the_last_one_out_stops_the_seeder(
    aws: flow.AwsClients, agent: Agent, capsys: pytest.CaptureFixture[str]
) -> None:
    instance_id = _instance(aws, "stopped")
    target = _target(aws, instance_id)
    clients = _clients(aws, agent)
    with agent.stub:
        # Run 1 starts the seeder; when it ends, run 2's command still runs there: not stopped under it.
        agent.a_run(instance_id)
        agent.commands(_command(OTHER_RUN, instance_id, "InProgress"))
        flow.rollback(clients, target, NAME, "r1", _options())
        assert _state(aws, instance_id) == "running"
        assert f"command {OTHER_RUN} still runs on it" in capsys.readouterr().err
        # Run 2 found it running; when it ends nothing else runs: the last one out stops it.
        agent.a_run(instance_id)
        agent.commands(_command(OTHER_RUN, instance_id, "Success"))
        flow.rollback(clients, target, NAME, "r2", _options())
        agent.stub.assert_no_pending_responses()
    assert _state(aws, instance_id) in {"stopping", "stopped"}


def test_a_seed_that_found_the_seeder_running_stops_it(aws: flow.AwsClients, agent: Agent) -> None:
    """A seeder found running (started by hand, kept up with --keep-running, or reached in the minute
    before its first boot's own stop) is stopped by the run that found it."""
    instance_id = _instance(aws, "running")
    target = _target(aws, instance_id)
    with agent.stub:
        agent.a_run(instance_id)
        agent.commands()
        flow.rollback(_clients(aws, agent), target, NAME, "r1", _options())
        agent.stub.assert_no_pending_responses()
    assert _state(aws, instance_id) in {"stopping", "stopped"}


def test_keep_running_never_asks_and_never_stops(aws: flow.AwsClients, agent: Agent) -> None:
    instance_id = _instance(aws, "stopped")
    target = _target(aws, instance_id)
    with agent.stub:
        agent.a_run(instance_id)  # and no list_commands: the Stubber fails on a call it was not given
        flow.rollback(_clients(aws, agent), target, NAME, "r1", _options(keep_running=True))
        agent.stub.assert_no_pending_responses()
    assert _state(aws, instance_id) == "running"


def test_a_seeder_stopped_by_another_run_meanwhile_is_started_again(
    aws: flow.AwsClients, agent: Agent, tmp_path: Path
) -> None:
    """Run 2 ended (and stopped the seeder) while this run was downloading: the sync starts it again."""
    from sd_lambda.seeding.sources import from_dir

    instance_id = _instance(aws, "stopped")
    target = _target(aws, instance_id)
    clients = _clients(aws, agent)
    options = _options()
    with agent.stub:
        agent.a_run(instance_id, restarted=True)
        agent.commands()
        with flow.seeder_session(clients, target, options) as run:
            release = from_dir(make_model(tmp_path / "m", "v1"))
            staged = flow.stage_local(clients, target, release, NAME, "r1", progress=False)
            aws.ec2.stop_instances(InstanceIds=[instance_id])  # the other run's stop
            assert _state(aws, instance_id) in {"stopping", "stopped"}
            flow.sync_on_seeder(clients, target, staged, options, run)
            assert _state(aws, instance_id) == "running"
        agent.stub.assert_no_pending_responses()
    assert _state(aws, instance_id) in {"stopping", "stopped"}
    sent = [c["Comment"] for c in aws.ssm.list_commands()["Commands"]]
    assert sent == ["sd-lambda mount check /mnt/models", f"sd-lambda seed {NAME}@r1"]


class AgentTakingCommands(Agent):
    """The Stubber'd client also takes SendCommand and CancelCommand: the run's own command ids are then
    known in advance, for the ListCommands answer to show them still unfinished."""

    STUBBED = Agent.STUBBED | {"send_command", "cancel_command"}

    def takes(self, command_id: str) -> None:
        self.stub.add_response("send_command", {"Command": {"CommandId": command_id}})


MOUNT_CHECK = "aaaaaaaa-2222-4333-8444-555555555555"
OURS = "bbbbbbbb-2222-4333-8444-555555555555"


def _interrupt(seconds: float) -> None:
    raise KeyboardInterrupt  # Ctrl-C while the driver waits between two polls of the sync


@pytest.mark.parametrize("ending", ["timed out", "interrupted"])
@pytest.mark.parametrize("other_run", [False, True], ids=["alone", "another run busy"])
def test_a_run_that_gives_up_on_its_command_stops_the_seeder_unless_another_runs_there(
    aws: flow.AwsClients, ending: str, other_run: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The driver's own command, cancelled (timeout or Ctrl-C) and so still Cancelling in ListCommands, is
    not a reason to leave the seeder running (#21 item 10); another run's InProgress command is."""
    agent = AgentTakingCommands(aws.ssm)
    instance_id = _instance(aws, "stopped")
    target = _target(aws, instance_id)
    clock = FakeClock()
    # Polls at t = 0 and 1000: past 600 + 60 + 120, the poll's deadline for a 60 s executionTimeout.
    options = flow.RunOptions(
        execution_timeout=60,
        poll_interval=1000,
        clock=clock,
        sleep=clock.sleep if ending == "timed out" else _interrupt,
    )
    with agent.stub:
        agent.online(instance_id)
        agent.takes(MOUNT_CHECK)
        agent.invocation("mounted: /mnt/models")
        agent.takes(OURS)
        agent.stub.add_response("get_command_invocation", {"Status": "InProgress"})
        if ending == "timed out":
            agent.stub.add_response("get_command_invocation", {"Status": "InProgress"})
        agent.stub.add_response("cancel_command", {}, {"CommandId": OURS, "InstanceIds": [instance_id]})
        others = [_command(OTHER_RUN, instance_id, "InProgress")] if other_run else []
        agent.commands(
            _command(OURS, instance_id, "Cancelling"), _command(MOUNT_CHECK, instance_id, "Success"), *others
        )
        expected = SeedError if ending == "timed out" else KeyboardInterrupt
        with pytest.raises(expected):
            flow.rollback(flow.AwsClients(aws.s3, aws.ec2, agent), target, NAME, "r1", options)
        agent.stub.assert_no_pending_responses()
    err = capsys.readouterr().err
    if other_run:
        assert _state(aws, instance_id) == "running"
        assert f"left running: command {OTHER_RUN} still runs on it" in err
    else:
        assert _state(aws, instance_id) in {"stopping", "stopped"}
        assert "left running" not in err


def test_the_docs_say_the_first_boot_stops_the_seeder() -> None:
    """The user data stops the instance after its first-boot setup: the guide must not say it stays up."""
    root = Path(__file__).parents[2]
    assert "shutdown -h" in (root / "infra/modules/seeder/user_data.sh.tftpl").read_text()
    guide = " ".join((root / "docs/seeding.md").read_text().split())
    assert "leaves it running after its first boot" not in guide
    assert "the first boot stops the instance itself once its setup is done" in guide
