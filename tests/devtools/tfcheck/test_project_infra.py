"""The project's own Terraform (infra/ and each infra/examples/*) is fmt-clean and validates offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_lambda.devtools.tfcheck import fmt_check, validate

INFRA = Path(__file__).resolve().parents[3] / "infra"
STACKS = [INFRA, *sorted(p for p in (INFRA / "examples").glob("*") if p.is_dir())]


def test_infra_is_terraform_fmt_clean() -> None:
    assert fmt_check(INFRA) == []


@pytest.mark.parametrize("stack", STACKS, ids=lambda p: str(p.relative_to(INFRA.parent)))
def test_stack_validates_against_the_real_provider_schema(stack: Path) -> None:
    result = validate(stack)
    assert result.valid, "\n".join(d.format(result.directory) for d in result.errors)
