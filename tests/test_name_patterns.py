"""Every pattern that checks a name or an identifier matches the whole string: ``$`` also matches just
before a trailing newline, so ``re.match(r"^...$", "v2\\n")`` accepts "v2\\n" (#21 item 12)."""

from __future__ import annotations

import re

import pytest

from sd_lambda.devtools.local.runtime import _INVOCATION, PREFIX
from sd_lambda.layout import LayoutError, check_name
from sd_lambda.ops.client import FUNCTION_URL_HOST
from sd_lambda.ops.container.registry import REPOSITORY_URL
from sd_lambda.ops.deploy import _PINNED_IMAGE

DIGEST = "sha256:" + "0" * 64
VALID = [
    pytest.param(FUNCTION_URL_HOST, "abc123.lambda-url.eu-west-1.on.aws", id="function-url-host"),
    pytest.param(
        REPOSITORY_URL, "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd-lambda", id="ecr-repository"
    ),
    pytest.param(
        _PINNED_IMAGE, f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd-lambda@{DIGEST}", id="pinned-image"
    ),
    pytest.param(_INVOCATION, f"{PREFIX}/invocation/req-1/response", id="runtime-invocation"),
]


@pytest.mark.parametrize(("pattern", "valid"), VALID)
def test_a_trailing_newline_is_not_part_of_a_valid_value(pattern: re.Pattern[str], valid: str) -> None:
    assert pattern.match(valid)
    assert not pattern.match(valid + "\n")


def test_model_and_revision_names() -> None:
    assert check_name("v2", "revision") == "v2"
    with pytest.raises(LayoutError, match="invalid revision 'v2\\\\n'"):
        check_name("v2\n", "revision")
