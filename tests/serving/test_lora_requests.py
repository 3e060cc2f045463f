"""LoRA adapters through the real handler (the Service the Lambda entry point runs), with the tiny model
and a tiny random LoRA: an adapter changes the image, never leaks into the next request, is listed by
/health, and every way to ask for one wrongly is a 4xx naming it (a broken one a 503)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release
from PIL import Image

from sd_lambda.devtools.local.launcher import LocalLambda
from sd_lambda.devtools.testing.models import build_test_lora
from sd_lambda.layout import ModelPaths, install_release
from sd_lambda.settings import Settings

from .conftest import LoggedService, body_json, url_event

REQUEST = {"prompt": "a red fox", "num_inference_steps": 3, "seed": 11, "output_format": "png"}
ADAPTER = "pixel-art"


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelPaths:
    root = tmp_path_factory.mktemp("models")
    paths = seed_release(root, TEST_MODEL_NAME, TEST_REVISION, tiny_model_dir)
    lora = build_test_lora(tmp_path_factory.mktemp("lora") / ADAPTER, tiny_model_dir).parent
    install_release(paths.adapter(ADAPTER), "a1", lora)
    return paths


def settings_for(model: ModelPaths, **overrides: Any) -> Settings:
    return Settings(model_root=model.model_dir.parent, model_name=TEST_MODEL_NAME, **overrides)


@pytest.fixture(scope="module")
def service(model: ModelPaths) -> LoggedService:
    return LoggedService(settings_for(model))


def image(response: dict[str, Any]) -> np.ndarray:
    assert response["statusCode"] == 200, response["body"]
    assert response["isBase64Encoded"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response["body"]))).convert("RGB")).astype(int)


def generate(service: LoggedService, **fields: Any) -> dict[str, Any]:
    return service(url_event(body={**REQUEST, **fields}))


def test_an_adapter_never_leaks_into_the_next_request(service: LoggedService, model: ModelPaths) -> None:
    """Request A with the adapter, request B without it: B is what a fresh environment gives."""
    styled = image(generate(service, loras=[{"name": ADAPTER, "scale": 1.0}]))
    after = image(generate(service))
    fresh = image(generate(LoggedService(settings_for(model))))
    assert np.abs(styled - fresh).max() > 0
    assert np.array_equal(after, fresh)


def test_scale_zero_is_the_image_without_the_adapter(service: LoggedService) -> None:
    plain = image(generate(service))
    zero = image(generate(service, loras=[{"name": ADAPTER, "scale": 0.0}]))
    assert np.abs(zero - plain).max() <= 1


def test_health_lists_the_adapters(service: LoggedService, model: ModelPaths) -> None:
    cold = body_json(LoggedService(settings_for(model))(url_event("GET", "/health")))
    assert (cold["loaded"], cold["loras"]) == (False, {"available": [ADAPTER]})  # before any load
    image(generate(service, loras=[{"name": ADAPTER, "scale": 0.5}]))
    health = body_json(service(url_event("GET", "/health")))
    assert "loras" in health["features"]
    assert health["loras"]["available"] == [ADAPTER]
    assert health["loras"]["loaded"] == {ADAPTER: "a1"}  # name -> the revision this environment holds


def test_an_unknown_adapter_is_a_400_naming_it(service: LoggedService) -> None:
    response = generate(
        service, loras=[{"name": ADAPTER, "scale": 1.0}, {"name": "no-such-style", "scale": 1}]
    )
    assert response["statusCode"] == 400
    error = body_json(response)["error"]
    assert error["code"] == "unknown_adapter"
    assert error["field"] == "loras[1].name"
    assert "'no-such-style'" in error["message"]
    assert ADAPTER in error["message"]  # what is available


def test_more_adapters_than_the_limit_is_a_400(model: ModelPaths) -> None:
    limited = LoggedService(settings_for(model, max_loras=1))
    loras = [{"name": ADAPTER, "scale": 1.0}, {"name": "other", "scale": 0.5}]
    response = limited(url_event(body={**REQUEST, "loras": loras}))
    assert response["statusCode"] == 400
    error = body_json(response)["error"]
    assert error["code"] == "too_many"
    assert error["field"] == "loras"
    assert "SD_MAX_LORAS" in error["message"]


def test_an_adapter_seeded_while_warm_is_served_without_a_reload(
    service: LoggedService, model: ModelPaths, tiny_model_dir: Path, tmp_path: Path
) -> None:
    plain = image(generate(service))
    loads = body_json(service(url_event("GET", "/health")))["loads"]
    late = model.adapter("late")
    install_release(late, "a1", build_test_lora(tmp_path / "late", tiny_model_dir, seed=3).parent)
    try:
        assert np.abs(image(generate(service, loras=[{"name": "late", "scale": 1.0}])) - plain).max() > 0
        assert body_json(service(url_event("GET", "/health")))["loads"] == loads
    finally:
        shutil.rmtree(late.model_dir)


def test_a_broken_adapter_is_a_503_and_the_next_request_is_served(
    service: LoggedService, model: ModelPaths, tiny_model_dir: Path, tmp_path: Path
) -> None:
    plain = image(generate(service))
    broken = model.adapter("broken")
    install_release(broken, "a1", build_test_lora(tmp_path / "broken", tiny_model_dir).parent)
    weights = broken.resolve_current() / "pytorch_lora_weights.safetensors"
    weights.write_bytes(b"\x08" + b"\x00" * 7 + b"{broken")
    try:
        response = generate(service, loras=[{"name": "broken", "scale": 1.0}])
        assert response["statusCode"] == 503
        error = body_json(response)["error"]
        assert error["code"] == "model_incomplete"
        assert "broken" in error["message"]
        assert np.array_equal(image(generate(service)), plain)
    finally:
        shutil.rmtree(broken.model_dir)


def test_the_openvino_engine_refuses_loras_as_unsupported(
    tiny_openvino_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    seed_release(root, TEST_MODEL_NAME, TEST_REVISION, tiny_openvino_model_dir)
    openvino = LoggedService(
        Settings(model_root=root, model_name=TEST_MODEL_NAME, openvino_cache_dir=str(tmp_path / "cache"))
    )
    response = openvino(url_event(body={**REQUEST, "loras": [{"name": ADAPTER, "scale": 1.0}]}))
    assert response["statusCode"] == 400
    error = body_json(response)["error"]
    assert (error["code"], error["field"]) == ("unsupported", "loras")
    assert "openvino" in error["message"]


def _invoke_png(environment: LocalLambda, **fields: Any) -> bytes:
    result = environment.invoke({**REQUEST, **fields})
    assert result.ok, result.payload
    (entry,) = json.loads(result.payload)["images"]
    return base64.b64decode(entry["image"])


def test_isolation_through_the_lambda_runtime(model: ModelPaths, tmp_path: Path) -> None:
    """The image's own entry point (awslambdaric against the local Runtime API): request A with the
    adapter, then B without it, in one environment; B is byte for byte a fresh environment's answer."""
    env = {"MODEL_ROOT": str(model.model_dir.parent), "MODEL_NAME": TEST_MODEL_NAME}
    with LocalLambda(env, timeout_s=300, log_path=tmp_path / "warm.log") as warm:
        styled = _invoke_png(warm, loras=[{"name": ADAPTER, "scale": 1.0}])
        after = _invoke_png(warm)
    with LocalLambda(env, timeout_s=300, log_path=tmp_path / "fresh.log") as fresh:
        first = _invoke_png(fresh)
    assert after == first
    assert styled != first


def test_a_request_without_loras_never_lists_the_adapters() -> None:
    """Listing adapters reads EFS: a plain text-to-image request must not wait on it."""
    from sd_lambda.serving.request import _refuse_unsupported, parse_request

    class NoListing:
        features = frozenset({"init_image", "loras"})

        @property
        def adapters(self) -> tuple[str, ...]:
            raise AssertionError("listed the adapters for a request that names none")

    _refuse_unsupported(parse_request({"prompt": "a fox"}, Settings()), NoListing())  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="listed"):
        _refuse_unsupported(
            parse_request({"prompt": "a fox", "loras": [{"name": ADAPTER, "scale": 1}]}, Settings()),
            NoListing(),  # type: ignore[arg-type]
        )
