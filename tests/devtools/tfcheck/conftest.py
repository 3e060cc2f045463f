"""Shared paths for the offline Terraform checks."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
POSITIVE = FIXTURES / "positive"
