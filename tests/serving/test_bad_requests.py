"""Every kind of bad input gets the right status and error code, and the warm model survives them all."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release

from sd_lambda.settings import Settings

from .conftest import LoggedService, body_json, url_event

GOOD = {"prompt": "a red fox", "num_inference_steps": 1, "width": 64, "height": 64, "seed": 7}


def with_(**changes: Any) -> dict[str, Any]:
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not REMOVE}


REMOVE = object()

# (id, event, status, code, field)
CASES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("missing prompt", url_event(body=with_(prompt=REMOVE)), 400, "missing_field", "prompt"),
    ("empty prompt", url_event(body=with_(prompt="")), 400, "empty", "prompt"),
    ("blank prompt", url_event(body=with_(prompt=" \t\n")), 400, "empty", "prompt"),
    ("prompt is a number", url_event(body=with_(prompt=42)), 400, "wrong_type", "prompt"),
    ("prompt is null", url_event(body=with_(prompt=None)), 400, "wrong_type", "prompt"),
    ("prompt is a list", url_event(body=with_(prompt=["a"])), 400, "wrong_type", "prompt"),
    ("prompt too long", url_event(body=with_(prompt="x" * 2001)), 400, "too_long", "prompt"),
    (
        "negative prompt too long",
        url_event(body=with_(negative_prompt="x" * 2001)),
        400,
        "too_long",
        "negative_prompt",
    ),
    (
        "steps is a bool",
        url_event(body=with_(num_inference_steps=True)),
        400,
        "wrong_type",
        "num_inference_steps",
    ),
    (
        "steps is a string",
        url_event(body=with_(num_inference_steps="10")),
        400,
        "wrong_type",
        "num_inference_steps",
    ),
    (
        "steps is a float",
        url_event(body=with_(num_inference_steps=2.0)),
        400,
        "wrong_type",
        "num_inference_steps",
    ),
    ("steps zero", url_event(body=with_(num_inference_steps=0)), 400, "out_of_range", "num_inference_steps"),
    (
        "steps negative",
        url_event(body=with_(num_inference_steps=-3)),
        400,
        "out_of_range",
        "num_inference_steps",
    ),
    (
        "steps huge",
        url_event(body=with_(num_inference_steps=10**9)),
        400,
        "out_of_range",
        "num_inference_steps",
    ),
    (
        "guidance NaN",
        url_event(body='{"prompt": "x", "guidance_scale": NaN}'),
        400,
        "not_finite",
        "guidance_scale",
    ),
    (
        "guidance inf",
        url_event(body='{"prompt": "x", "guidance_scale": Infinity}'),
        400,
        "not_finite",
        "guidance_scale",
    ),
    (
        "guidance 1e999",
        url_event(body='{"prompt": "x", "guidance_scale": 1e999}'),
        400,
        "not_finite",
        "guidance_scale",
    ),
    ("guidance negative", url_event(body=with_(guidance_scale=-0.5)), 400, "out_of_range", "guidance_scale"),
    ("guidance too high", url_event(body=with_(guidance_scale=20.5)), 400, "out_of_range", "guidance_scale"),
    ("guidance is a bool", url_event(body=with_(guidance_scale=False)), 400, "wrong_type", "guidance_scale"),
    ("width not multiple of 8", url_event(body=with_(width=100)), 400, "not_multiple", "width"),
    ("height zero", url_event(body=with_(height=0)), 400, "out_of_range", "height"),
    ("width over max side", url_event(body=with_(width=2048)), 400, "out_of_range", "width"),
    (
        "over the pixel budget",
        url_event(body=with_(width=1024, height=1024)),
        400,
        "too_many_pixels",
        "width",
    ),
    ("seed negative", url_event(body=with_(seed=-1)), 400, "out_of_range", "seed"),
    ("seed over 2^32-1", url_event(body=with_(seed=2**32)), 400, "out_of_range", "seed"),
    ("seed is a float", url_event(body=with_(seed=1.5)), 400, "wrong_type", "seed"),
    ("unknown field", url_event(body=with_(steps=10)), 400, "unknown_field", "steps"),
    ("unknown format", url_event(body=with_(output_format="gif")), 400, "invalid_choice", "output_format"),
    (
        "format is case-sensitive",
        url_event(body=with_(output_format="PNG")),
        400,
        "invalid_choice",
        "output_format",
    ),
    ("quality zero", url_event(body=with_(output_format="jpeg", quality=0)), 400, "out_of_range", "quality"),
    (
        "quality over 100",
        url_event(body=with_(output_format="webp", quality=101)),
        400,
        "out_of_range",
        "quality",
    ),
    ("unknown scheduler", url_event(body=with_(scheduler="karras")), 400, "invalid_choice", "scheduler"),
    ("unknown decoder", url_event(body=with_(decoder="huge")), 400, "invalid_choice", "decoder"),
    ("invalid JSON", url_event(body='{"prompt": "x",'), 400, "invalid_json", None),
    ("JSON nested 20,000 deep", url_event(body="[" * 20_000), 400, "invalid_json", None),
    (
        "5,000-digit integer",
        url_event(body='{"prompt": "x", "seed": ' + "9" * 5000 + "}"),
        400,
        "invalid_json",
        None,
    ),
    ("not UTF-8", url_event(body=b"\xff\xfe{}", base64_body=True), 400, "invalid_json", None),
    (
        "invalid base64",
        {**url_event(body=GOOD), "body": "%%%not-base64", "isBase64Encoded": True},
        400,
        "invalid_base64",
        None,
    ),
    ("JSON array", url_event(body=[GOOD]), 400, "not_an_object", None),
    ("JSON string", url_event(body='"a red fox"'), 400, "not_an_object", None),
    ("JSON null", url_event(body="null"), 400, "not_an_object", None),
    ("empty body", url_event(body=""), 400, "invalid_json", None),
    ("oversized body", url_event(body=with_(prompt="x" * 70_000)), 413, "request_too_large", None),
    (
        "oversized base64 body",
        url_event(body=with_(prompt="x" * 70_000), base64_body=True),
        413,
        "request_too_large",
        None,
    ),
    ("GET /", url_event(method="GET", body=""), 405, "method_not_allowed", None),
    ("POST /health", url_event(path="/health", body=GOOD), 405, "method_not_allowed", None),
    ("wrong path", url_event(path="/generate", body=GOOD), 404, "not_found", None),
]


@pytest.fixture(scope="module", params=["torch", "openvino"])
def warm(
    request: pytest.FixtureRequest, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> LoggedService:
    """A warm service on each engine: bad input gets the same answer whichever engine serves."""
    if request.param == "openvino":
        root = tmp_path_factory.mktemp("openvino-models")
        seed_release(root, TEST_MODEL_NAME, TEST_REVISION, request.getfixturevalue("tiny_openvino_model_dir"))
        cache = str(tmp_path_factory.mktemp("openvino-cache"))
        settings = Settings(model_root=root, model_name=TEST_MODEL_NAME, openvino_cache_dir=cache)
    service = LoggedService(settings)
    response = service(url_event(body=GOOD))
    assert response["statusCode"] == 200, response
    assert service.predictor.loads == 1
    assert body_json(service(url_event(method="GET", path="/health")))["engine"] == request.param
    return service


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("event", "status", "code", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gets_a_specific_error(
    warm: LoggedService, event: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    response = warm(event)
    assert response["statusCode"] == status
    assert response["headers"]["content-type"] == "application/json"
    error = body_json(response)["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]
    assert "Traceback" not in response["body"]
    assert warm.predictor.loads == 1


def test_messages_name_the_problem(warm: LoggedService) -> None:
    def message(event: dict[str, Any]) -> str:
        return body_json(warm(event))["error"]["message"]

    assert message(url_event(body=with_(num_inference_steps=500))) == (
        "num_inference_steps must be between 1 and 50, got 500"
    )
    assert message(url_event(body=with_(steps=1, sampler="x"))).startswith("unknown fields: steps, sampler")
    assert message(url_event(body=with_(seed=True))) == "seed must be an integer, got boolean"
    assert "SD_MAX_PIXELS" in message(url_event(body=with_(width=1024, height=1024)))
    assert "pndm" in message(url_event(body=with_(scheduler="karras")))


def test_wrong_method_names_the_allowed_one(warm: LoggedService) -> None:
    response = warm(url_event(method="DELETE", path="/health"))
    assert response["statusCode"] == 405
    assert response["headers"]["allow"] == "GET"


def test_direct_invoke_errors_are_json_objects(warm: LoggedService) -> None:
    assert warm(["not", "an", "object"]) == {
        "error": {
            "code": "not_an_object",
            "message": "the request must be a JSON object, got array",
            "field": None,
        },
        "statusCode": 400,
    }
    result = warm({**GOOD, "width": 12})
    assert result["statusCode"] == 400
    assert result["error"]["code"] == "not_multiple"


def test_every_bad_request_logged_its_outcome(warm: LoggedService) -> None:
    warm(url_event(body=with_(seed=-1)))
    line = warm.log_lines()[-1]
    assert (line["status"], line["outcome"], line["kind"]) == (400, "out_of_range", "http")
    assert line["error"] == "seed must be between 0 and 4294967295, got -1"


def test_good_request_after_all_bad_inputs_does_not_reload(warm: LoggedService) -> None:
    for _, event, *_ in CASES:
        warm(event)
    response = warm(url_event(body=GOOD))
    assert response["statusCode"] == 200
    assert response["headers"]["content-type"] == "image/png"
    assert base64.b64decode(response["body"]).startswith(b"\x89PNG")
    assert warm.predictor.loads == 1
