"""The deploy preflight: every problem in one line each, before anything is created (Stubber for STS and
Lambda, a fake docker, the real var-file resolution against infra/variables.tf)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from sd_lambda.cli import main as cli_main
from sd_lambda.ops import deploy
from sd_lambda.ops.container.docker import DockerFailed
from sd_lambda.ops.preflight import Findings, PreflightInputs, run_preflight, terraform_problem
from sd_lambda.ops.stack_outputs import TerraformNotFoundError, terraform_binary
from sd_lambda.ops.tfvars import effective_values

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
REGION = "eu-west-1"
IDENTITY = {"UserId": "AIDA", "Account": "123456789012", "Arn": "arn:aws:iam::123456789012:user/deployer"}


def settings(total: int, unreserved: int | None = None) -> dict[str, Any]:
    return {
        "AccountLimit": {
            "TotalCodeSize": 80530636800,
            "CodeSizeUnzipped": 262144000,
            "CodeSizeZipped": 52428800,
            "ConcurrentExecutions": total,
            "UnreservedConcurrentExecutions": total if unreserved is None else unreserved,
        },
        "AccountUsage": {"TotalCodeSize": 0, "FunctionCount": 0},
    }


class StubbedAws:
    """Clients whose answers are queued with Stubber; ``assert_used`` checks every answer was asked for."""

    def __init__(self) -> None:
        credentials = {"aws_access_key_id": "x", "aws_secret_access_key": "y"}
        self.clients = {
            service: boto3.client(service, region_name=REGION, **credentials) for service in ("sts", "lambda")
        }
        self.stubbers = {service: Stubber(client) for service, client in self.clients.items()}
        for stubber in self.stubbers.values():
            stubber.activate()

    def __call__(self, service: str, region: str) -> Any:
        assert region == REGION
        return self.clients[service]

    def identity(self) -> StubbedAws:
        self.stubbers["sts"].add_response("get_caller_identity", IDENTITY, {})
        return self

    def account(self, total: int, unreserved: int | None = None) -> StubbedAws:
        self.stubbers["lambda"].add_response("get_account_settings", settings(total, unreserved), {})
        return self

    def reservation(self, held: int | None) -> StubbedAws:
        expected = {"FunctionName": "sd-lambda"}
        if held is None:
            self.stubbers["lambda"].add_client_error(
                "get_function_concurrency", "ResourceNotFoundException", http_status_code=404
            )
        else:
            answer = {"ReservedConcurrentExecutions": held} if held else {}
            self.stubbers["lambda"].add_response("get_function_concurrency", answer, expected)
        return self

    def assert_used(self) -> None:
        for stubber in self.stubbers.values():
            stubber.assert_no_pending_responses()


class FakeDocker:
    def __init__(self, engine: bool = True, buildx: bool = True) -> None:
        self.engine = engine
        self.buildx = buildx

    def __call__(
        self, args: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        if args[0] == "version" and not self.engine:
            raise DockerFailed("docker version failed (exit 1): Cannot connect to the Docker daemon")
        if list(args[:2]) == ["buildx", "version"] and not self.buildx:
            raise DockerFailed("docker buildx version failed (exit 1): 'buildx' is not a docker command")
        return ""


def inputs(reserved: int | None = None, memory: int = 10240) -> PreflightInputs:
    return PreflightInputs(
        region=REGION, function_name="sd-lambda", reserved_concurrency=reserved, memory_size=memory
    )


A_WORKING_DOCKER = FakeDocker()


def check(
    given: PreflightInputs,
    aws: StubbedAws,
    docker: FakeDocker | None = A_WORKING_DOCKER,  # None: an image is given, no docker
    terraform: Callable[[], str | None] = lambda: None,
) -> Findings:
    findings = run_preflight(given, aws, docker, terraform_check=terraform)
    aws.assert_used()
    return findings


def test_a_standard_account_with_a_reservation_passes() -> None:
    findings = check(inputs(reserved=2), StubbedAws().identity().account(1000).reservation(None))

    assert findings.problems == findings.warnings == []
    assert "AWS account 123456789012" in findings.facts[0]


def test_a_reservation_a_new_account_cannot_give_is_refused_with_what_to_do() -> None:
    findings = check(inputs(reserved=2, memory=3008), StubbedAws().identity().account(10).reservation(None))

    assert findings.problems == [
        "reserved_concurrency=2 would leave 8 of this account's 10 concurrent executions unreserved in "
        "eu-west-1; Lambda refuses fewer than 100: set reserved_concurrency = null (no reservation) or a "
        "smaller number, or request more (Service Quotas > AWS Lambda > 'Concurrent executions' "
        "(L-B99A9384))"
    ]


def test_no_reservation_is_never_refused() -> None:
    findings = check(inputs(reserved=None, memory=3008), StubbedAws().identity().account(10))

    assert findings.problems == findings.warnings == []


def test_the_boundary_is_100_left_unreserved() -> None:
    refused = check(inputs(reserved=901), StubbedAws().identity().account(1000).reservation(0))
    allowed = check(inputs(reserved=900), StubbedAws().identity().account(1000).reservation(0))

    assert "would leave 99 of" in refused.problems[0]
    assert allowed.problems == []


def test_the_reservation_the_function_already_holds_counts_as_available() -> None:
    # 1000 in total, 900 reserved of which this function holds 5: 6 would leave 99, keeping 5 leaves 100.
    keep = check(inputs(reserved=5), StubbedAws().identity().account(1000, unreserved=100).reservation(5))
    grow = check(inputs(reserved=6), StubbedAws().identity().account(1000, unreserved=100).reservation(5))

    assert keep.problems == []
    assert "would leave 99 of" in grow.problems[0]


def test_a_new_account_warns_about_memory_above_3008() -> None:
    findings = check(inputs(memory=10240), StubbedAws().identity().account(10))

    assert findings.problems == []
    assert findings.warnings == [
        "this account's Lambda concurrency limit is 10, as in a new account: memory_size=10240 MB is above "
        "the 3008 MB a new account may use: set memory_size = 3008 (--var-file... or --var "
        "memory_size=3008), or request higher Lambda quotas (Service Quotas > AWS Lambda > 'Concurrent "
        "executions' (L-B99A9384); AWS also raises them with use)"
    ]
    assert check(inputs(memory=10240), StubbedAws().identity().account(1000)).warnings == []


def test_unreadable_account_settings_are_a_problem() -> None:
    aws = StubbedAws().identity()
    aws.stubbers["lambda"].add_client_error("get_account_settings", "AccessDeniedException", "denied")

    findings = check(inputs(), aws)

    assert findings.problems[0].startswith(
        "cannot read the account's Lambda limits (lambda:GetAccountSettings in eu-west-1)"
    )


def test_rejected_credentials_skip_the_lambda_checks() -> None:
    aws = StubbedAws()
    aws.stubbers["sts"].add_client_error("get_caller_identity", "ExpiredToken", "The security token expired")

    findings = check(inputs(reserved=2), aws)

    assert findings.problems == [
        "AWS credentials do not work (sts:GetCallerIdentity): ExpiredToken: The security token expired"
    ]


def test_no_region_is_one_line() -> None:
    findings = run_preflight(
        PreflightInputs(None, "sd-lambda", None, 3008),
        lambda service, region: pytest.fail("no AWS call without a region"),
        None,
        terraform_check=lambda: None,
    )

    assert findings.problems == [
        "no AWS region: pass --region <region> (or set AWS_REGION, or region in your profile or tfvars)"
    ]


@pytest.mark.parametrize(
    ("docker", "problem", "warning"),
    [
        (FakeDocker(engine=False), "the Docker engine is not reachable", None),
        (FakeDocker(buildx=False), None, "docker has no buildx plugin: the image is built with the legacy"),
    ],
)
def test_docker_engine_and_buildx(docker: FakeDocker, problem: str | None, warning: str | None) -> None:
    findings = check(inputs(memory=3008), StubbedAws().identity().account(1000), docker)

    assert [p[: len(problem)] for p in findings.problems] == ([problem] if problem else [])
    assert [w[: len(warning)] for w in findings.warnings] == ([warning] if warning else [])
    if problem:
        assert findings.problems[0].endswith(
            "or pass --image-uri <ecr_repository_url>@sha256:<digest> to deploy an image built elsewhere"
        )


def test_docker_is_not_asked_when_an_image_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without docker (None: what deploy.preflight passes when an image is given) nothing docker is checked.
    assert check(inputs(memory=3008), StubbedAws().identity().account(1000), None).problems == []
    monkeypatch.setattr(deploy, "docker_cli", lambda binary: pytest.fail("an image is given: no docker"))
    monkeypatch.setattr(deploy, "run_preflight", lambda given, clients, docker: Findings())

    deploy.preflight(deploy.DeployOptions(infra_dir=INFRA, region=REGION), build_image=False)


def test_no_permission_to_read_the_reservation_is_one_problem_naming_the_action() -> None:
    """AccessDeniedException from GetFunctionConcurrency (not just ResourceNotFoundException) is a finding."""
    aws = StubbedAws().identity().account(10)
    aws.stubbers["lambda"].add_client_error(
        "get_function_concurrency",
        "AccessDeniedException",
        "User: arn:aws:iam::123456789012:user/deployer is not authorized to perform: "
        "lambda:GetFunctionConcurrency",
        http_status_code=403,
    )

    findings = check(inputs(reserved=2, memory=10240), aws)

    assert findings.problems == [
        "cannot read sd-lambda's reserved concurrency (lambda:GetFunctionConcurrency in eu-west-1): "
        "AccessDeniedException: User: arn:aws:iam::123456789012:user/deployer is not authorized to "
        "perform: lambda:GetFunctionConcurrency"
    ]
    assert findings.warnings[0].startswith("this account's Lambda concurrency limit is 10")  # still checked


def test_cli_preflight_turns_an_access_denied_into_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    aws = StubbedAws().identity().account(1000)
    aws.stubbers["lambda"].add_client_error(
        "get_function_concurrency", "AccessDeniedException", "not authorized", http_status_code=403
    )
    monkeypatch.setattr(deploy, "boto3_client", aws)
    monkeypatch.setattr("sd_lambda.ops.preflight.terraform_problem", lambda: None)
    image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd-lambda@sha256:" + "ab" * 32

    code = cli_main(
        [
            "deploy",
            "preflight",
            "--infra",
            str(INFRA),
            "--region",
            REGION,
            "--var",
            "reserved_concurrency=3",
            "--image-uri",
            image,
        ]
    )

    err = capfd.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert err.splitlines() == [
        "preflight: cannot read sd-lambda's reserved concurrency (lambda:GetFunctionConcurrency in "
        "eu-west-1): AccessDeniedException: not authorized",
        "sd-lambda deploy: error: preflight found 1 problem (above); nothing was created",
    ]


def _run_returning(stdout: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    return lambda argv, **_: subprocess.CompletedProcess(argv, 0, stdout=stdout, stderr="")


def test_terraform_version_is_checked() -> None:
    found = lambda: "/usr/bin/terraform"  # noqa: E731

    assert terraform_problem(found, _run_returning('{"terraform_version": "1.5.7"}')) == (
        "terraform 1.5.7 is older than 1.6: install Terraform >= 1.6 "
        "(https://developer.hashicorp.com/terraform/install) and put it on PATH"
    )
    assert terraform_problem(found, _run_returning('{"terraform_version": "1.6.0"}')) is None
    assert terraform_problem(found, _run_returning('{"terraform_version": "1.10.2"}')) is None


def test_the_terraform_check_finds_terraform_as_the_deploy_commands_do(no_terraform_on_path: None) -> None:
    # One lookup (stack_outputs.terraform_binary) and one message for the preflight and the commands.
    assert inspect.signature(terraform_problem).parameters["find"].default is terraform_binary
    with pytest.raises(TerraformNotFoundError) as missing:
        terraform_binary()
    assert terraform_problem() == str(missing.value)
    assert terraform_problem().startswith("terraform is not on PATH: install Terraform >= 1.6")


################################################################################
# Effective values: --var over var files (HCL and JSON) over infra/variables.tf
################################################################################


def test_effective_values_follow_terraform_precedence(tmp_path: Path) -> None:
    hcl = tmp_path / "prod.tfvars"
    hcl.write_text('name = "sd-prod"\nreserved_concurrency = 4\nmemory_size = 3008\n')
    as_json = tmp_path / "more.tfvars.json"
    as_json.write_text(json.dumps({"reserved_concurrency": None}))
    names = ["name", "region", "reserved_concurrency", "memory_size"]

    defaults = effective_values(INFRA, names, environ={})
    from_files = effective_values(INFRA, names, [hcl, as_json], environ={})
    from_cli = effective_values(
        INFRA, names, [hcl], {"memory_size": "2048", "region": "eu-west-1"}, environ={}
    )

    assert defaults == {
        "name": "sd-lambda",
        "region": None,
        "reserved_concurrency": None,
        "memory_size": 10240,
    }
    assert from_files == {
        "name": "sd-prod",
        "region": None,
        "reserved_concurrency": None,
        "memory_size": 3008,
    }
    assert from_cli["memory_size"] == 2048
    assert from_cli["region"] == "eu-west-1"
    assert from_cli["reserved_concurrency"] == 4
    assert effective_values(INFRA, ["memory_size"], environ={"TF_VAR_memory_size": "1024"}) == {
        "memory_size": 1024
    }


################################################################################
# The command: `sd-lambda deploy preflight` and the first step of `deploy apply`
################################################################################


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_cli_reports_every_problem_one_line_each_and_creates_nothing(
    no_aws_credentials: None,
    no_terraform_on_path: None,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(deploy, "docker_cli", lambda binary: FakeDocker(engine=False))
    monkeypatch.setattr(
        deploy, "_stack", lambda options: pytest.fail("nothing may run after a failed preflight")
    )

    code = cli_main(["deploy", "apply", "--infra", str(INFRA), "--region", REGION, "--push-command", "x"])

    err = capfd.readouterr().err.splitlines()
    assert code == 1
    assert err == [
        "preflight: no AWS credentials found: configure a profile, SSO (aws sso login) or environment "
        "credentials",
        "preflight: terraform is not on PATH: install Terraform >= 1.6 "
        "(https://developer.hashicorp.com/terraform/install) and put it on PATH",
        "preflight: the Docker engine is not reachable (docker version failed (exit 1): Cannot connect to "
        "the Docker daemon); start Docker and retry; or pass "
        "--image-uri <ecr_repository_url>@sha256:<digest> to deploy an image built elsewhere",
        "sd-lambda deploy: error: preflight found 3 problems (above); nothing was created",
    ]


def test_cli_preflight_reads_the_stack_values_and_passes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    aws = StubbedAws().identity().account(1000).reservation(None)
    monkeypatch.setattr(deploy, "boto3_client", aws)
    monkeypatch.setattr(deploy, "docker_cli", lambda binary: pytest.fail("an image is given: no docker"))
    monkeypatch.setattr("sd_lambda.ops.preflight.terraform_problem", lambda: None)
    tfvars = tmp_path / "prod.tfvars"
    tfvars.write_text("reserved_concurrency = 3\n")
    image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd-lambda@sha256:" + "ab" * 32

    code = cli_main(
        [
            "deploy",
            "preflight",
            "--infra",
            str(INFRA),
            "--region",
            REGION,
            "--var-file",
            str(tfvars),
            "--image-uri",
            image,
        ]
    )

    out = capfd.readouterr().out
    assert code == 0, out
    assert out.splitlines()[-1] == "preflight: ok"
    aws.assert_used()  # GetFunctionConcurrency was asked: the var file's reservation was seen


def test_apply_runs_the_preflight_before_terraform(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    def failing_preflight(
        options: deploy.DeployOptions, build_image: bool, docker_binary: str, values: deploy.StackValues
    ) -> None:
        order.append(f"preflight build_image={build_image} docker={docker_binary}")
        raise deploy.StackError("preflight found 1 problem (above); nothing was created")

    monkeypatch.setattr(deploy, "preflight", failing_preflight)
    monkeypatch.setattr(deploy, "_stack", lambda options: order.append("terraform"))

    code = cli_main(
        ["deploy", "apply", "--infra", str(INFRA), "--push-command", "make x", "--docker", "podman"]
    )

    assert code == 1
    assert order == ["preflight build_image=True docker=podman"]


def test_a_var_file_that_does_not_parse_is_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.tfvars"
    broken.write_text('memory_size = = "a"\n')

    code = cli_main(["deploy", "preflight", "--infra", str(INFRA), "--var-file", str(broken)])

    err = capfd.readouterr().err.splitlines()
    assert code == 1
    assert len(err) == 1
    assert err[0].startswith(f"sd-lambda deploy: error: cannot parse {broken}: ")


def test_a_non_number_reservation_is_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["deploy", "preflight", "--infra", str(INFRA), "--var", "reserved_concurrency=two"])

    assert code == 1
    assert capfd.readouterr().err == (
        "sd-lambda deploy: error: reserved_concurrency must be a whole number or null, got 'two'\n"
    )


def test_each_bad_sd_variable_of_the_function_is_one_problem() -> None:
    environment = {
        "SD_PREFETCH": "1",
        "SD_MAX_STEPS": "0",
        "SD_ACCEL": "fast",
        "SD_MAX_SIDE": "512",
        "SD_MAX_STEP": "8",
        "MODEL_ROOT": "/somewhere/else",  # the stack sets MODEL_ROOT and MODEL_NAME itself
    }
    given = PreflightInputs(REGION, "sd-lambda", None, 3008, environment=environment)

    findings = check(given, StubbedAws().identity().account(1000), docker=None)

    accel, *others = findings.problems
    assert accel.startswith(
        "environment_variables: SD_ACCEL='fast': unknown acceleration fast; known: prefetch"
    )
    assert others == [
        "environment_variables: SD_MAX_STEPS=0 is below the minimum 1",
        "environment_variables: SD_PREFETCH was retired: use SD_ACCEL=+prefetch",
    ]
    assert findings.warnings == [
        "environment_variables: the function reads no SD_MAX_STEP (the ones it reads: docs/api.md, "
        "Configuration)"
    ]


@pytest.mark.parametrize(
    ("source", "retired"),
    [
        ("var-file", 'environment_variables = {\n  SD_SMALL_MAP_CONVS = "0"\n  SD_MALLOC_TUNE = 1\n}\n'),
        ("--var", '{SD_SMALL_MAP_CONVS = "0", SD_MALLOC_TUNE = 1}'),
        ("TF_VAR_", '{"SD_SMALL_MAP_CONVS": "0", "SD_MALLOC_TUNE": "1"}'),
    ],
)
def test_cli_preflight_refuses_retired_variables_in_the_stack_before_anything_runs(
    source: str,
    retired: str,
    no_aws_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("sd_lambda.ops.preflight.terraform_problem", lambda: None)
    argv = ["deploy", "preflight", "--infra", str(INFRA), "--region", REGION, "--image-uri", "x"]
    if source == "var-file":
        tfvars = tmp_path / "prod.tfvars"
        tfvars.write_text(retired)
        argv += ["--var-file", str(tfvars)]
    elif source == "--var":
        argv += ["--var", f"environment_variables={retired}"]
    else:
        monkeypatch.setenv("TF_VAR_environment_variables", retired)

    code = cli_main(argv)

    err = capfd.readouterr().err.splitlines()
    assert code == 1
    assert err[:2] == [
        "preflight: environment_variables: SD_MALLOC_TUNE was retired: use SD_ACCEL=+heap_keep,-heap_trim",
        "preflight: environment_variables: SD_SMALL_MAP_CONVS was retired: use SD_ACCEL=-small_map_convs",
    ]
    assert err[-1] == "sd-lambda deploy: error: preflight found 3 problems (above); nothing was created"


def test_a_stack_environment_that_is_not_a_map_is_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    code = cli_main(
        ["deploy", "preflight", "--infra", str(INFRA), "--var", "environment_variables={SD_ACCEL="]
    )

    assert code == 1
    err = capfd.readouterr().err
    assert err.startswith("sd-lambda deploy: error: cannot parse environment_variables={SD_ACCEL=: ")
    assert err.count("\n") == 1


def test_the_deploy_commands_never_import_torch() -> None:
    script = (
        "import sys\n"
        "import argparse\n"
        "import sd_lambda.ops.deploy, sd_lambda.ops.preflight\n"
        "import sd_lambda.ops.tfvars, sd_lambda.ops.plan_guard\n"
        "sd_lambda.ops.deploy.register(argparse.ArgumentParser().add_subparsers())\n"
        "print('torch' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)

    assert completed.stdout.strip() == "False"
