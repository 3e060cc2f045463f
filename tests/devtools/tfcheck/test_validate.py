"""Real Terraform core + the stub provider catch real mistakes, with the right file and line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sd_lambda.devtools.tfcheck import ValidationResult, fmt_check, validate
from sd_lambda.devtools.tfcheck.runner import TfCheckError, Workspace

from .conftest import FIXTURES, POSITIVE

NEGATIVE_CASES = [
    # fixture, file, line, summary, words the detail must contain
    ("misspelled_argument", "main.tf", 4, "Unsupported argument", '"throughput_mod"'),
    ("missing_required_argument", "main.tf", 5, "Missing required argument", '"file_system_id"'),
    ("bad_nested_block", "main.tf", 10, "Unsupported block type", '"creation_information"'),
    ("bad_reference", "main.tf", 6, "Unsupported attribute", '"dns_hostname"'),
    ("undeclared_module_variable", "main.tf", 4, "Unsupported argument", '"encrypted"'),
]


@pytest.fixture(scope="module")
def negative_results() -> dict[str, ValidationResult]:
    # Validated from the repository root on purpose: Terraform must check the fixture, not the cwd.
    return {case[0]: validate(FIXTURES / case[0]) for case in NEGATIVE_CASES}


@pytest.mark.parametrize(("fixture", "filename", "line", "summary", "detail"), NEGATIVE_CASES)
def test_validate_reports_each_mistake_at_its_file_and_line(
    negative_results: dict[str, ValidationResult],
    fixture: str,
    filename: str,
    line: int,
    summary: str,
    detail: str,
) -> None:
    result = negative_results[fixture]
    assert not result.valid
    assert [(d.filename, d.line, d.summary) for d in result.errors] == [(filename, line, summary)]
    assert detail in result.errors[0].detail
    location = os.path.relpath(FIXTURES / fixture / filename)
    assert result.errors[0].format(result.directory).startswith(f"{location}:{line}: error: {summary} — ")


def test_positive_fixture_validates_with_no_diagnostics() -> None:
    result = validate(POSITIVE)
    assert result.valid
    assert result.diagnostics == []


def test_directory_without_terraform_files_is_never_valid(tmp_path: Path) -> None:
    result = validate(tmp_path)
    assert not result.valid
    assert result.errors[0].summary == "No Terraform files"


def test_unknown_resource_type_is_rejected_by_the_served_schema(tmp_path: Path) -> None:
    (tmp_path / "main.tf").write_text('resource "aws_efs_filesystem" "x" {\n  encrypted = true\n}\n')
    result = validate(tmp_path)
    assert [(d.filename, d.line) for d in result.errors] == [("main.tf", 1)]
    assert "aws_efs_filesystem" in result.errors[0].detail


def test_fixtures_are_terraform_fmt_clean() -> None:
    assert fmt_check(FIXTURES) == []


def test_fmt_check_lists_unformatted_files_recursively(tmp_path: Path) -> None:
    (tmp_path / "ok.tf").write_text("locals {\n  a = 1\n}\n")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "ugly.tf").write_text("locals {\na=1\n  bb   = 2\n}\n")
    assert fmt_check(tmp_path) == ["nested/ugly.tf"]


def test_fmt_check_reports_syntax_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.tf").write_text("locals {\n")
    with pytest.raises(TfCheckError, match="terraform fmt could not check"):
        fmt_check(tmp_path)


def test_missing_schema_is_an_error_not_a_skip(tmp_path: Path) -> None:
    with pytest.raises(TfCheckError, match="aws provider schema not found"):
        Workspace(cache_dir=tmp_path / "cache", schema_path=tmp_path / "nope.json.gz")


def test_workspace_generates_an_executable_provider_launcher(tmp_path: Path) -> None:
    workspace = Workspace(cache_dir=tmp_path / "cache")
    launcher = workspace.plugin_dir / "terraform-provider-aws"
    assert launcher.stat().st_mode & 0o111
    assert "-m sd_lambda.devtools.tfcheck.provider" in launcher.read_text()
    assert str(workspace.plugin_dir) in workspace.cli_config.read_text()
