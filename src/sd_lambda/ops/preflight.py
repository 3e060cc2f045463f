"""``sd-lambda deploy preflight`` (``make preflight``): what ``make apply`` needs, checked in seconds
before anything is created, every problem reported (one line each, with what to do), not just the first.

Checked: AWS credentials and region (STS GetCallerIdentity); ``terraform`` >= 1.6 on PATH; the Docker
engine unless an image is given (buildx is optional: without it the legacy builder runs); and the
account's Lambda limits (GetAccountSettings) against the effective ``reserved_concurrency`` and
``memory_size`` of the stack (``--var``, var files, else ``infra/variables.tf``); and each ``SD_`` entry
of its ``environment_variables`` as the function's init reads it (a bad one would fail every cold start).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sd_lambda.cli import ask_for, option
from sd_lambda.ops.aws_identity import CredentialsError, caller_identity
from sd_lambda.ops.container.docker import Docker, DockerFailed, DockerUnavailable, has_buildx, require_engine
from sd_lambda.ops.stack_outputs import TERRAFORM_INSTALL_HINT, TerraformNotFoundError, terraform_binary
from sd_lambda.settings import RETIRED_VARIABLES, Settings, documented_variables

MINIMUM_TERRAFORM = (1, 6)
# PutFunctionConcurrency: "you can reserve concurrency ... as long as you leave at least 100 simultaneous
# executions unreserved" (https://docs.aws.amazon.com/lambda/latest/api/API_PutFunctionConcurrency.html).
MINIMUM_UNRESERVED_CONCURRENCY = 100
# "New AWS accounts have reduced concurrency and memory quotas"
# (https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html). No API reports the memory
# quota; a concurrency limit too small to reserve anything is the visible mark of such an account, whose
# CreateFunction refuses MemorySize above 3008.
NEW_ACCOUNT_CONCURRENCY_LIMIT = MINIMUM_UNRESERVED_CONCURRENCY
NEW_ACCOUNT_MEMORY_MB = 3008
CONCURRENCY_QUOTA = "Service Quotas > AWS Lambda > 'Concurrent executions' (L-B99A9384)"

ClientFactory = Callable[[str, str], Any]  # (service, region) -> boto3 client


def memory_cap_advice(memory_size: int | None) -> str:
    """What to do when the account caps memory at 3008 MB: the preflight's warning and the driver's
    translation of CreateFunction's refusal say the same."""
    return (
        f"memory_size={memory_size} MB is above the {NEW_ACCOUNT_MEMORY_MB} MB a new account may use: set "
        f"memory_size = {NEW_ACCOUNT_MEMORY_MB} ({option('--var-file')}... "
        f"or --var memory_size={NEW_ACCOUNT_MEMORY_MB}), "
        f"or request higher Lambda quotas ({CONCURRENCY_QUOTA}; AWS also raises them with use)"
    )


@dataclass(frozen=True)
class PreflightInputs:
    region: str | None
    function_name: str
    reserved_concurrency: int | None  # None: no reservation
    memory_size: int | None
    # The stack's environment_variables (the stack itself adds MODEL_ROOT and MODEL_NAME).
    environment: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)  # what was found (account, limits): context lines


def terraform_problem(
    find: Callable[[], str] = terraform_binary,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> str | None:
    # The same lookup and message the deploy commands use when they start terraform.
    try:
        binary = find()
    except TerraformNotFoundError as exc:
        return str(exc)
    completed = run([binary, "version", "-json"], capture_output=True, text=True, check=False)
    try:
        version = json.loads(completed.stdout)["terraform_version"]
    except (ValueError, KeyError, TypeError):
        return f"`{binary} version -json` did not report a version: {TERRAFORM_INSTALL_HINT}"
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if numbers < MINIMUM_TERRAFORM:
        return f"terraform {version} is older than 1.6: {TERRAFORM_INSTALL_HINT}"
    return None


def docker_findings(docker: Docker, findings: Findings) -> None:
    image = ask_for("--image-uri", "<ecr_repository_url>@sha256:<digest>")
    hint = f"or {image} to deploy an image built elsewhere"
    try:
        require_engine(docker)
    except DockerUnavailable as exc:
        findings.problems.append(f"{exc}; {hint}")
        return
    if not has_buildx(docker):
        findings.warnings.append(
            "docker has no buildx plugin: the image is built with the legacy builder (Lambda accepts its "
            "single-manifest push); install docker-buildx for BuildKit builds"
        )


def environment_findings(environment: Mapping[str, str], findings: Findings) -> None:
    """Each ``SD_`` variable checked alone, as the function's init reads it: one problem per bad value."""
    known = {name for name, _, _ in documented_variables()}
    for name, value in sorted(environment.items()):
        if not name.startswith("SD_"):
            continue
        if name not in known and name not in RETIRED_VARIABLES:
            findings.warnings.append(
                f"environment_variables: the function reads no {name} (the ones it reads: docs/api.md, "
                "Configuration)"
            )
            continue
        try:
            Settings.from_env({name: value})
        except ValueError as exc:
            findings.problems.append(f"environment_variables: {exc}")


def _account_findings(inputs: PreflightInputs, lambda_client: Any, findings: Findings) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        limits = lambda_client.get_account_settings()["AccountLimit"]
    except (BotoCoreError, ClientError) as exc:
        findings.problems.append(
            f"cannot read the account's Lambda limits (lambda:GetAccountSettings in {inputs.region}): "
            + _aws_refusal(exc)
        )
        return
    total = int(limits.get("ConcurrentExecutions", 0))
    unreserved = int(limits.get("UnreservedConcurrentExecutions", total))
    findings.facts.append(
        f"Lambda in {inputs.region}: {total} concurrent executions, {unreserved} unreserved"
    )
    if inputs.reserved_concurrency is not None:
        # A reservation this function already holds is counted as reserved; updating it frees that first.
        try:
            held = _reserved_by_function(lambda_client, inputs.function_name)
        except (BotoCoreError, ClientError) as exc:
            findings.problems.append(
                f"cannot read {inputs.function_name}'s reserved concurrency (lambda:GetFunctionConcurrency "
                f"in {inputs.region}): {_aws_refusal(exc)}"
            )
        else:
            left = unreserved + held - inputs.reserved_concurrency
            if left < MINIMUM_UNRESERVED_CONCURRENCY:
                findings.problems.append(
                    f"reserved_concurrency={inputs.reserved_concurrency} would leave {left} of this "
                    f"account's {total} concurrent executions unreserved in {inputs.region}; Lambda refuses "
                    f"fewer than {MINIMUM_UNRESERVED_CONCURRENCY}: set reserved_concurrency = null (no "
                    f"reservation) or a smaller number, or request more ({CONCURRENCY_QUOTA})"
                )
    memory = inputs.memory_size
    if total <= NEW_ACCOUNT_CONCURRENCY_LIMIT and memory is not None and memory > NEW_ACCOUNT_MEMORY_MB:
        findings.warnings.append(
            f"this account's Lambda concurrency limit is {total}, as in a new account: "
            + memory_cap_advice(memory)
        )


def _reserved_by_function(lambda_client: Any, function_name: str) -> int:
    """What ``function_name`` reserves now; 0 when it does not exist yet (GetFunctionConcurrency answers
    ResourceNotFoundException, https://docs.aws.amazon.com/lambda/latest/api/API_GetFunctionConcurrency.html).
    Any other refusal (AccessDeniedException without lambda:GetFunctionConcurrency) propagates."""
    try:
        answer = lambda_client.get_function_concurrency(FunctionName=function_name)
    except lambda_client.exceptions.ResourceNotFoundException:
        return 0
    return int(answer.get("ReservedConcurrentExecutions") or 0)


def _aws_refusal(exc: Exception) -> str:
    """One line from a botocore error: its code and message, never a traceback."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'ClientError')}: {error.get('Message', '')}".strip()
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def aws_findings(inputs: PreflightInputs, clients: ClientFactory, findings: Findings) -> None:
    if not inputs.region:
        findings.problems.append(
            f"no AWS region: {ask_for('--region', '<region>')} (or set AWS_REGION, or region in your profile "
            "or tfvars)"
        )
        return
    try:
        identity = caller_identity(clients("sts", inputs.region))
    except CredentialsError as exc:
        findings.problems.append(str(exc))
        return
    findings.facts.append(f"AWS account {identity['Account']} as {identity['Arn']} in {inputs.region}")
    _account_findings(inputs, clients("lambda", inputs.region), findings)


def run_preflight(
    inputs: PreflightInputs,
    clients: ClientFactory,
    docker: Docker | None,
    terraform_check: Callable[[], str | None] = terraform_problem,
) -> Findings:
    """Every check, independent of the others' outcome (bar AWS calls without credentials)."""
    findings = Findings()
    environment_findings(inputs.environment, findings)
    aws_findings(inputs, clients, findings)
    terraform = terraform_check()
    if terraform is not None:
        findings.problems.append(terraform)
    if docker is not None:  # None: an image is given, so nothing is built
        try:
            docker_findings(docker, findings)
        except DockerFailed as exc:
            findings.problems.append(str(exc))
    return findings
