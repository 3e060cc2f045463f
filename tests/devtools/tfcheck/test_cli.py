"""``sd-lambda tfcheck``: readable diagnostics, exit status 1 on errors, one-line messages on bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sd_lambda.cli import main

from .conftest import FIXTURES, POSITIVE


def test_validate_prints_file_line_summary_and_detail(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tfcheck", "validate", str(FIXTURES / "misspelled_argument"), str(POSITIVE)]) == 1
    out, err = capsys.readouterr()
    location = os.path.relpath(FIXTURES / "misspelled_argument" / "main.tf")
    expected = f'{location}:4: error: Unsupported argument — An argument named "throughput_mod" is not'
    assert expected in err
    assert "INVALID (1 error(s))" in out
    assert f"{POSITIVE}: valid" in out


def test_validate_exits_zero_when_everything_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tfcheck", "validate", str(POSITIVE)]) == 0
    assert capsys.readouterr().out.strip() == f"{POSITIVE}: valid"


def test_plan_prints_addresses_and_actions(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tfcheck", "plan", "--var-file", str(POSITIVE / "offline.tfvars"), str(POSITIVE)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{POSITIVE}: 17 resource change(s)" in out
    assert "  create   aws_lambda_function_url.generate" in out
    assert "  read     data.aws_iam_policy_document.efs_client" in out


def test_plan_failure_prints_diagnostics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tfcheck", "plan", str(POSITIVE)]) == 1
    err = capsys.readouterr().err
    assert "variables.tf:1: error: No value for required variable" in err
    assert "plan FAILED" in err


def test_fmt_lists_files_to_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ugly.tf").write_text("locals {\na=1\n}\n")
    assert main(["tfcheck", "fmt", str(tmp_path)]) == 1
    assert f"{tmp_path / 'ugly.tf'}: needs `terraform fmt`" in capsys.readouterr().err


def test_bad_directory_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tfcheck", "plan", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err == f"sd-lambda tfcheck: error: {tmp_path / 'missing'} is not a directory\n"
