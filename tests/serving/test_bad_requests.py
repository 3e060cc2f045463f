"""Every kind of bad input gets the right status and error code, and the warm model survives them all."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release

from sd_lambda.settings import Settings

from .conftest import LoggedService, body_json, encoded, gradient, png_claiming, url_event

GOOD = {"prompt": "a red fox", "num_inference_steps": 1, "width": 64, "height": 64, "seed": 7}


def with_(**changes: Any) -> dict[str, Any]:
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not REMOVE}


REMOVE = object()
# Over SD_MAX_REQUEST_BYTES's default (Lambda's 6 MB: room for an init image).
OVER_BODY_LIMIT = Settings().max_request_bytes + 1
JSON = {"accept": "application/json"}
START = encoded(gradient(64, 64), "PNG")
LORA = {"name": "style", "scale": 0.8}
# One byte over SD_MAX_INIT_IMAGE_BYTES: the same base64 length as the limit itself (4,000,000 = 1 mod 3),
# so only the decoded size tells.
OVER_INIT_IMAGE = base64.b64encode(b"\0" * (Settings().max_init_image_bytes + 1)).decode()

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
    ("oversized body", url_event(body=with_(prompt="x" * OVER_BODY_LIMIT)), 413, "request_too_large", None),
    (
        "oversized base64 body",
        url_event(body=with_(prompt="x" * OVER_BODY_LIMIT), base64_body=True),
        413,
        "request_too_large",
        None,
    ),
    # several images
    ("num_images zero", url_event(body=with_(num_images=0), headers=JSON), 400, "out_of_range", "num_images"),
    ("too many images", url_event(body=with_(num_images=5), headers=JSON), 400, "out_of_range", "num_images"),
    ("num_images is a bool", url_event(body=with_(num_images=True)), 400, "wrong_type", "num_images"),
    ("num_images is a float", url_event(body=with_(num_images=2.0)), 400, "wrong_type", "num_images"),
    ("several images as binary", url_event(body=with_(num_images=2)), 400, "needs_json", "num_images"),
    # image-to-image
    (
        "strength without init_image",
        url_event(body=with_(strength=0.5)),
        400,
        "strength_without_init_image",
        "strength",
    ),
    (
        "strength over 1",
        url_event(body=with_(init_image=START, strength=1.5)),
        400,
        "out_of_range",
        "strength",
    ),
    (
        "strength negative",
        url_event(body=with_(init_image=START, strength=-0.1)),
        400,
        "out_of_range",
        "strength",
    ),
    (
        "strength is a string",
        url_event(body=with_(init_image=START, strength="0.5")),
        400,
        "wrong_type",
        "strength",
    ),
    ("init_image is a number", url_event(body=with_(init_image=5)), 400, "wrong_type", "init_image"),
    ("init_image wrong base64", url_event(body=with_(init_image="%%%")), 400, "invalid_base64", "init_image"),
    ("init_image empty", url_event(body=with_(init_image="")), 400, "empty", "init_image"),
    (
        "init_image not an image",
        url_event(body=with_(init_image=base64.b64encode(b"plain text").decode())),
        400,
        "invalid_image",
        "init_image",
    ),
    (
        "init_image a GIF",
        url_event(body=with_(init_image=encoded(gradient(), "GIF"))),
        400,
        "invalid_image",
        "init_image",
    ),
    (
        "init_image a decompression bomb",
        url_event(body=with_(init_image=png_claiming(40_000, 40_000))),
        400,
        "init_image_too_many_pixels",
        "init_image",
    ),
    (
        "init_image over the pixel cap",
        url_event(body=with_(init_image=png_claiming(4_000, 4_000))),
        400,
        "init_image_too_many_pixels",
        "init_image",
    ),
    (
        "init_image over its byte limit",
        url_event(body=with_(init_image=OVER_INIT_IMAGE)),
        413,
        "init_image_too_large",
        "init_image",
    ),
    # LoRA adapters (the request's shape; what the engine holds is checked below)
    ("loras not a list", url_event(body=with_(loras=LORA)), 400, "wrong_type", "loras"),
    ("lora not an object", url_event(body=with_(loras=["style"])), 400, "wrong_type", "loras[0]"),
    (
        "lora without a scale",
        url_event(body=with_(loras=[{"name": "style"}])),
        400,
        "missing_field",
        "loras[0].scale",
    ),
    (
        "lora unknown key",
        url_event(body=with_(loras=[{**LORA, "weight": 1}])),
        400,
        "unknown_field",
        "loras[0].weight",
    ),
    (
        "lora scale out of range",
        url_event(body=with_(loras=[{**LORA, "scale": 3}])),
        400,
        "out_of_range",
        "loras[0].scale",
    ),
    (
        "lora scale is a bool",
        url_event(body=with_(loras=[{**LORA, "scale": True}])),
        400,
        "wrong_type",
        "loras[0].scale",
    ),
    (
        "lora name a path",
        url_event(body=with_(loras=[{**LORA, "name": "../x"}])),
        400,
        "invalid_name",
        "loras[0].name",
    ),
    (
        "lora named twice",
        url_event(body=with_(loras=[LORA, {**LORA, "scale": 0.1}])),
        400,
        "duplicate_adapter",
        "loras",
    ),
    (
        "too many loras",
        url_event(body=with_(loras=[{**LORA, "name": f"style{i}"} for i in range(4)])),
        400,
        "too_many",
        "loras",
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


def engine_of(warm: LoggedService) -> str:
    return body_json(warm(url_event(method="GET", path="/health")))["engine"]


def test_init_image_is_served_by_torch_and_unsupported_on_openvino(warm: LoggedService) -> None:
    response = warm(url_event(body=with_(init_image=START, strength=0.5)))
    if engine_of(warm) == "torch":
        assert response["statusCode"] == 200, response["body"]
        return
    assert response["statusCode"] == 400
    error = body_json(response)["error"]
    assert (error["code"], error["field"]) == ("unsupported", "init_image")
    assert "openvino engine" in error["message"]


def test_an_adapter_the_engine_does_not_hold_is_refused_naming_it(warm: LoggedService) -> None:
    error = body_json(warm(url_event(body=with_(loras=[{"name": "no-such-style", "scale": 1}]))))["error"]
    if engine_of(warm) == "openvino":
        assert (error["code"], error["field"]) == ("unsupported", "loras")
        return
    assert (error["code"], error["field"]) == ("unknown_adapter", "loras[0].name")
    assert "'no-such-style'" in error["message"]
    assert "available:" in error["message"]


def test_several_images_as_binary_say_to_ask_for_json(warm: LoggedService) -> None:
    message = body_json(warm(url_event(body=with_(num_images=2))))["error"]["message"]
    assert "accept: application/json" in message


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
