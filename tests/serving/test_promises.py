"""Promises the README makes about requests that no other test held (found by mutating the code)."""

from __future__ import annotations

import base64

import pytest

from sd_lambda.serving.errors import ApiError
from sd_lambda.serving.events import HttpRequest, http_request, wants_json
from sd_lambda.serving.request import GenerationRequest, parse_request
from sd_lambda.settings import Settings

from .conftest import LoggedService, url_event

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
    assert with_nulls["images"] == without["images"]


# 65,536 leaves a remainder of 1 when divided by 3, so one byte more base64-encodes to the same length:
# only the size check after decoding can tell the two apart.
LIMIT = 64 * 1024


@pytest.mark.parametrize(("size", "refused"), [(LIMIT, False), (LIMIT + 1, True)])
def test_the_request_limit_counts_bytes_after_base64_decoding(size: int, refused: bool) -> None:
    assert len(base64.b64encode(b"x" * LIMIT)) == len(base64.b64encode(b"x" * (LIMIT + 1)))
    event = url_event(body=b"x" * size, base64_body=True)
    if refused:
        with pytest.raises(ApiError) as raised:
            http_request(event, LIMIT)
        assert (raised.value.status, raised.value.code) == (413, "request_too_large")
    else:
        assert len(http_request(event, LIMIT).body) == LIMIT


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        # */* covers every image type: at q=1 it outranks JSON at q=0.5, as image/png itself would.
        ("application/json;q=0.5, */*", False),
        ("*/*;q=0.1, application/json", True),
    ],
)
def test_a_wildcard_accept_counts_as_asking_for_an_image(accept: str, expected: bool) -> None:
    assert wants_json(HttpRequest("POST", "/", {"accept": accept}, b"")) is expected
