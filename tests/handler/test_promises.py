"""Promises the README makes about requests that no other test held (found by mutating the code)."""

from __future__ import annotations

import base64

import pytest

from sd_lambda.request import GenerationRequest, parse_request
from sd_lambda.settings import Settings

from .conftest import LoggedService

OPTIONAL_FIELDS = [name for name, field in GenerationRequest.model_fields.items() if not field.is_required()]


@pytest.fixture(scope="module")
def warm(settings: Settings) -> LoggedService:
    return LoggedService(settings)


@pytest.mark.parametrize("name", OPTIONAL_FIELDS)
def test_null_is_the_same_as_absent_for_every_optional_field(settings: Settings, name: str) -> None:
    assert parse_request({"prompt": "a fox", name: None}, settings) == parse_request(
        {"prompt": "a fox"}, settings
    )


def test_a_request_of_nulls_generates_what_the_same_request_without_them_does(warm: LoggedService) -> None:
    request = {"prompt": "a fox", "num_inference_steps": 1, "seed": 5}
    with_nulls = warm({**request, **dict.fromkeys(set(OPTIONAL_FIELDS) - set(request))})
    without = warm(request)
    assert "error" not in with_nulls, with_nulls
    assert (with_nulls["format"], with_nulls["width"], with_nulls["height"]) == ("png", 64, 64)
    assert base64.b64decode(with_nulls["image"]) == base64.b64decode(without["image"])
