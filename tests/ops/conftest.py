"""Fixtures for the operator-tool tests: the stand-in stack ``deploy`` drives (builtin provider only)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def deploy_stack(tmp_path: Path) -> Path:
    """A copy of a stand-in stack (builtin provider only) with the root stack's deploy-relevant interface."""
    stack = tmp_path / "stack"
    shutil.copytree(FIXTURES / "deploy_stack", stack)
    return stack
