"""Plan-level guarantees of jobs (jobs_enabled): least-privilege S3, KMS and self-invoke grants, the
network path without a NAT, the async invoke config and the lifecycle rule; and nothing of it when off.

Real Terraform plans made offline (tfcheck), read as `terraform show -json` documents.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_stack_plan import INFRA, KMS_KEY, REPO, ROOT_VARS, module_config, resources, statements, tfvars

from sd_lambda.devtools.tfcheck import PlanError, plan

pytestmark = pytest.mark.slow

BUCKET = "acme-weights"
FUNCTION_ARN = "arn:aws:lambda:eu-west-1:123456789012:function:sd-jobs"
JOB_OBJECTS = f"arn:aws:s3:::{BUCKET}/jobs/*"
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
JOBS_VARIABLES = {
    "name": "sd-jobs",
    "region": "eu-west-1",
    "kms_key_arn": KMS_KEY,
    "weights_bucket_name": BUCKET,
    "image_uri": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd-jobs@sha256:" + "b" * 64,
    "jobs_enabled": True,
}


@pytest.fixture(scope="module")
def jobs_plan() -> dict[str, Any]:
    return plan(INFRA, JOBS_VARIABLES)


@pytest.fixture(scope="module")
def jobs_off_plan() -> dict[str, Any]:
    return plan(INFRA, {**JOBS_VARIABLES, "jobs_enabled": False})


def by_address(document: dict[str, Any], address: str) -> dict[str, Any]:
    found = [r for r in resources(document) if r["address"] == address]
    assert len(found) == 1, f"{address} not planned; planned: {[r['address'] for r in resources(document)]}"
    return found[0]["values"]


def function_environment(document: dict[str, Any]) -> dict[str, str]:
    return by_address(document, "module.lambda.aws_lambda_function.this[0]")["environment"][0]["variables"]


def test_function_role_writes_and_reads_only_the_jobs_prefix(jobs_plan: dict[str, Any]) -> None:
    policy = statements(jobs_plan, "module.lambda.data.aws_iam_policy_document.jobs[0]")
    assert set(policy) == {
        "WriteJobObjects",
        "ReadJobObjects",
        "ListJobObjects",
        "EncryptJobObjects",
        "StartOwnJobs",
    }
    assert (policy["WriteJobObjects"]["actions"], policy["WriteJobObjects"]["resources"]) == (
        {"s3:PutObject"},
        [JOB_OBJECTS],
    )
    assert (policy["ReadJobObjects"]["actions"], policy["ReadJobObjects"]["resources"]) == (
        {"s3:GetObject"},
        [JOB_OBJECTS],
    )
    listing = policy["ListJobObjects"]
    assert (listing["actions"], listing["resources"]) == ({"s3:ListBucket"}, [f"arn:aws:s3:::{BUCKET}"])
    assert listing["conditions"] == {"s3:prefix": ("StringLike", ["jobs/*"])}
    every_resource = [arn for statement in policy.values() for arn in statement["resources"]]
    assert "*" not in every_resource
    assert f"arn:aws:s3:::{BUCKET}/*" not in every_resource  # never bucket-wide


def test_function_may_use_the_bucket_key_only_through_s3_for_that_bucket(jobs_plan: dict[str, Any]) -> None:
    encrypt = statements(jobs_plan, "module.lambda.data.aws_iam_policy_document.jobs[0]")["EncryptJobObjects"]
    assert encrypt["actions"] == {"kms:GenerateDataKey", "kms:Decrypt"}
    assert encrypt["resources"] == [KMS_KEY]
    assert encrypt["conditions"] == {
        "kms:EncryptionContext:aws:s3:arn": ("StringLike", [f"arn:aws:s3:::{BUCKET}", JOB_OBJECTS]),
        "kms:ViaService": ("StringEquals", ["s3.eu-west-1.amazonaws.com"]),
    }


def test_function_may_invoke_only_itself(jobs_plan: dict[str, Any]) -> None:
    start = statements(jobs_plan, "module.lambda.data.aws_iam_policy_document.jobs[0]")["StartOwnJobs"]
    assert (start["actions"], start["resources"]) == ({"lambda:InvokeFunction"}, [FUNCTION_ARN])
    # Named from the function's name, not its resource: the role's policy exists before the function.
    lambda_module = module_config(jobs_plan, "lambda")
    document = next(
        r for r in lambda_module["module"]["resources"] if r["address"] == "data.aws_iam_policy_document.jobs"
    )
    statement = next(
        s for s in document["expressions"]["statement"] if s["sid"]["constant_value"] == "StartOwnJobs"
    )
    assert statement["resources"]["references"][0] == "local.function_arn"


def test_async_invocations_are_not_retried_and_age_out(jobs_plan: dict[str, Any]) -> None:
    config = by_address(jobs_plan, "module.lambda.aws_lambda_function_event_invoke_config.this[0]")
    assert (config["function_name"], config["maximum_retry_attempts"]) == ("sd-jobs", 0)
    assert config["maximum_event_age_in_seconds"] == 3600
    environment = function_environment(jobs_plan)
    assert environment["SD_JOBS_MAX_EVENT_AGE"] == "3600"


def test_the_handler_gets_the_jobs_settings(jobs_plan: dict[str, Any]) -> None:
    environment = function_environment(jobs_plan)
    assert {key: environment[key] for key in ("SD_JOBS_BUCKET", "SD_JOBS_PREFIX", "SD_JOBS_URL_TTL")} == {
        "SD_JOBS_BUCKET": BUCKET,
        "SD_JOBS_PREFIX": "jobs/",
        "SD_JOBS_URL_TTL": "900",
    }
    # The endpoint's DNS name is known after apply ...
    change = next(
        c
        for c in jobs_plan["resource_changes"]
        if c["address"] == "module.lambda.aws_lambda_function.this[0]"
    )
    assert change["change"]["after_unknown"]["environment"][0]["variables"]["SD_JOBS_LAMBDA_ENDPOINT"] is True
    # ... and wired from the network module's endpoint.
    call = module_config(jobs_plan, "lambda")["expressions"]["jobs_lambda_endpoint_url"]
    assert call["references"][0] == "module.network"  # one(module.network[*].lambda_endpoint_url)


def test_a_private_lambda_endpoint_admits_only_the_function(jobs_plan: dict[str, Any]) -> None:
    endpoint = by_address(jobs_plan, "module.network[0].aws_vpc_endpoint.lambda[0]")
    assert endpoint["service_name"] == "com.amazonaws.eu-west-1.lambda"
    assert endpoint["vpc_endpoint_type"] == "Interface"
    assert endpoint["private_dns_enabled"] is False  # the VPC's lambda.<region> name stays as it was
    assert json.loads(endpoint["policy"])["Statement"] == [
        {
            "Sid": "InvokeTheStacksFunction",
            "Effect": "Allow",
            "Action": "lambda:InvokeFunction",
            "Resource": FUNCTION_ARN,
            "Principal": "*",
        }
    ]
    rules = {r["address"]: r["values"] for r in resources(jobs_plan) if "security_group_" in r["type"]}
    ingress = rules[
        'module.network[0].aws_vpc_security_group_ingress_rule.this["lambda_endpoint_from_lambda"]'
    ]
    egress = rules['module.network[0].aws_vpc_security_group_egress_rule.this["lambda_to_lambda_endpoint"]']
    for rule in (ingress, egress):
        assert (rule["ip_protocol"], rule["from_port"], rule["to_port"]) == ("tcp", 443, 443)
        assert rule.get("cidr_ipv4") is None
        assert rule.get("cidr_ipv6") is None


def test_the_function_reaches_s3_through_the_gateway_endpoint(jobs_plan: dict[str, Any]) -> None:
    s3_rule = by_address(
        jobs_plan, 'module.network[0].aws_vpc_security_group_egress_rule.this["lambda_to_s3"]'
    )
    prefix_list = next(
        r
        for r in jobs_plan["prior_state"]["values"]["root_module"]["child_modules"]
        for r in r.get("resources", [])
        if r["address"] == "module.network[0].data.aws_ec2_managed_prefix_list.s3"
    )
    assert s3_rule["prefix_list_id"] == prefix_list["values"]["id"]
    assert (s3_rule["from_port"], s3_rule["to_port"]) == (443, 443)
    # Every private subnet (the function's) shares the one route table the gateway endpoint is on.
    associations = resources(jobs_plan, "aws_route_table_association")
    subnets = resources(jobs_plan, "aws_subnet")
    assert len(associations) == len(subnets) >= 2
    network = module_config(jobs_plan, "network")["module"]["resources"]
    association = next(r for r in network if r["address"] == "aws_route_table_association.private")
    assert association["expressions"]["route_table_id"]["references"][0].startswith("aws_route_table.private")
    gateway = by_address(jobs_plan, "module.network[0].aws_vpc_endpoint.s3[0]")
    assert gateway["vpc_endpoint_type"] == "Gateway"
    # The new VPC's endpoint policy lets the jobs' writes through, and only under the prefix.
    endpoint_policy = statements(jobs_plan, "module.network[0].data.aws_iam_policy_document.s3_endpoint[0]")
    assert endpoint_policy["WriteJobObjects"]["actions"] == {"s3:PutObject"}
    assert endpoint_policy["WriteJobObjects"]["resources"] == [JOB_OBJECTS]


def test_job_objects_expire(jobs_plan: dict[str, Any]) -> None:
    lifecycle = by_address(jobs_plan, "module.weights_bucket.aws_s3_bucket_lifecycle_configuration.this[0]")
    rule = next(r for r in lifecycle["rule"] if r["id"] == "expire-jobs")
    assert rule["status"] == "Enabled"
    assert rule["filter"][0]["prefix"] == "jobs/"
    assert rule["expiration"][0]["days"] == 7
    assert rule["noncurrent_version_expiration"][0]["noncurrent_days"] == 1


def test_expiry_days_and_limits_pass_through_from_the_root() -> None:
    document = plan(
        INFRA,
        {
            **JOBS_VARIABLES,
            "jobs_expiration_days": 2,
            "jobs_url_ttl_seconds": 300,
            "jobs_maximum_event_age_seconds": 600,
            "jobs_maximum_retry_attempts": 1,
            "jobs_prefix": "work/jobs/",
        },
    )
    lifecycle = by_address(document, "module.weights_bucket.aws_s3_bucket_lifecycle_configuration.this[0]")
    rule = next(r for r in lifecycle["rule"] if r["id"] == "expire-work-jobs")
    assert (rule["filter"][0]["prefix"], rule["expiration"][0]["days"]) == ("work/jobs/", 2)
    config = by_address(document, "module.lambda.aws_lambda_function_event_invoke_config.this[0]")
    assert (config["maximum_retry_attempts"], config["maximum_event_age_in_seconds"]) == (1, 600)
    environment = function_environment(document)
    assert (environment["SD_JOBS_PREFIX"], environment["SD_JOBS_URL_TTL"]) == ("work/jobs/", "300")
    assert environment["SD_JOBS_MAX_EVENT_AGE"] == "600"
    policy = statements(document, "module.lambda.data.aws_iam_policy_document.jobs[0]")
    assert policy["WriteJobObjects"]["resources"] == [f"arn:aws:s3:::{BUCKET}/work/jobs/*"]


def test_jobs_off_adds_nothing(jobs_off_plan: dict[str, Any]) -> None:
    addresses = {r["address"] for r in resources(jobs_off_plan)}
    assert not [a for a in addresses if "event_invoke_config" in a or "aws_vpc_endpoint.lambda" in a]
    assert not [a for a in addresses if "lambda_endpoint" in a or '"lambda_to_s3"' in a]
    assert "module.lambda.aws_iam_role_policy.jobs[0]" not in addresses
    assert not [key for key in function_environment(jobs_off_plan) if key.startswith("SD_JOBS_")]
    lifecycle = by_address(
        jobs_off_plan, "module.weights_bucket.aws_s3_bucket_lifecycle_configuration.this[0]"
    )
    assert [r["id"] for r in lifecycle["rule"]] == ["tidy-versions-and-uploads"]
    endpoint_policy = statements(
        jobs_off_plan, "module.network[0].data.aws_iam_policy_document.s3_endpoint[0]"
    )
    assert "WriteJobObjects" not in endpoint_policy


def test_jobs_are_off_by_default() -> None:
    document = plan(INFRA, {}, var_files=[ROOT_VARS])
    assert "jobs_enabled" not in tfvars(ROOT_VARS)
    assert not [
        r for r in resources(document) if r["address"].startswith("module.network[0].aws_vpc_endpoint.lambda")
    ]
    assert document["variables"]["jobs_enabled"]["value"] is False


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"create_weights_bucket": False}, "jobs_enabled = true keeps the jobs in the weights bucket"),
        ({"jobs_maximum_retry_attempts": 3}, "jobs_maximum_retry_attempts must be 0, 1 or 2"),
        (
            {"jobs_url_ttl_seconds": 7200},
            "jobs_url_ttl must be a whole number of seconds between 60 and 3600",
        ),
        ({"jobs_maximum_event_age_seconds": 30}, "between 60 and 21600"),
        ({"jobs_prefix": "jobs"}, "must be key segments ending in /"),
        ({"jobs_expiration_days": 0}, "expiring_prefix_days must be a whole number of days"),
    ],
    ids=["existing-bucket", "retries", "url-ttl", "event-age", "prefix", "expiry"],
)
def test_jobs_variables_are_validated(variables: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError) as caught:
        plan(INFRA, {**JOBS_VARIABLES, **variables})
    errors = " ".join(f"{d.summary} {d.detail}" for d in caught.value.diagnostics if d.severity == "error")
    assert message in " ".join(errors.split())


@pytest.mark.parametrize("state", ["jobs_plan", "jobs_off_plan"])
def test_checkov_passes_both_toggle_states(
    state: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """checkov over the planned values (its terraform_plan framework), with jobs on and off."""
    assert_checkov_passes(request.getfixturevalue(state), tmp_path / f"{state}.json")


def assert_checkov_passes(document: dict[str, Any], plan_file: Path) -> None:
    """checkov's terraform_plan framework over one plan document: no failed check."""
    assert CHECKOV.is_file(), f"checkov is not installed at {CHECKOV}: run `make security`"
    plan_file.write_text(json.dumps(document))
    completed = subprocess.run(
        [
            str(CHECKOV),
            "--file",
            str(plan_file),
            "--framework",
            "terraform_plan",
            # Maps the plan back to infra/, so the inline checkov:skip comments (with their reasons) apply.
            "--repo-root-for-plan-enrichment",
            str(INFRA),
            "--skip-download",
            "--compact",
        ],
        cwd=REPO / "infra",
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = completed.stdout + completed.stderr
    assert "Passed checks:" in report, report
    assert "Failed checks: 0," in report, report
