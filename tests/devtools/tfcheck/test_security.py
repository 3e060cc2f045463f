"""checkov over infra/ and image/ (what `make security` runs): zero failed checks, skips only inline."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
SCANNED = ["infra", "image"]


def test_checkov_finds_no_failed_checks() -> None:
    assert CHECKOV.is_file(), f"checkov is not installed at {CHECKOV}: run `make test` (or `make security`)"
    command = [str(CHECKOV), "--skip-download", "--compact", "--quiet"]
    for directory in SCANNED:
        command += ["--directory", directory]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    report = completed.stdout + completed.stderr
    assert completed.returncode == 0, report
    assert "Parsing errors" not in report, report
    passed = [int(n) for n in re.findall(r"terraform scan results:\s+Passed checks: (\d+)", report)]
    assert passed, f"checkov scanned no Terraform:\n{report}"
    assert passed[0] > 0, report
