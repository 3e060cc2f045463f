"""The handler's behaviour in-process: responses, health, 503s, 500s, the log line, the response limit."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release
from PIL import Image

from sd_lambda.engine.accel.prefetch import prefetch_current
from sd_lambda.engine.torch_engine import Engine
from sd_lambda.layout import ModelPaths
from sd_lambda.serving.predictor import Predictor
from sd_lambda.settings import Settings

from .conftest import LoggedService, body_json, encoded, gradient, url_event

REQUEST = {"prompt": "a red fox", "num_inference_steps": 1, "seed": 11}


@pytest.fixture(scope="module")
def warm(settings: Settings) -> LoggedService:
    return LoggedService(settings)


def test_png_response_has_the_requested_size_and_metadata_headers(warm: LoggedService) -> None:
    response = warm(url_event(body={**REQUEST, "width": 48, "height": 32}))
    assert response["statusCode"] == 200
    assert response["isBase64Encoded"] is True
    headers = response["headers"]
    assert headers["content-type"] == "image/png"
    assert headers["x-seed"] == "11"
    assert (headers["x-model"], headers["x-model-revision"]) == (TEST_MODEL_NAME, TEST_REVISION)
    assert {"load", "inference", "encode"} <= {
        part.split(";")[0] for part in headers["server-timing"].split(", ")
    }
    image = Image.open(io.BytesIO(base64.b64decode(response["body"])))
    assert (image.format, image.size) == ("PNG", (48, 32))


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_other_formats(warm: LoggedService, output_format: str, pil_format: str) -> None:
    response = warm(url_event(body={**REQUEST, "output_format": output_format, "quality": 70}))
    assert response["headers"]["content-type"] == f"image/{output_format}"
    assert Image.open(io.BytesIO(base64.b64decode(response["body"]))).format == pil_format


def test_accept_json_returns_the_documented_object(warm: LoggedService) -> None:
    response = warm(url_event(body=REQUEST, headers={"accept": "text/html, application/json;q=0.9"}))
    assert response["headers"]["content-type"] == "application/json"
    result = body_json(response)
    assert {"images", "seed", "model", "timings"} <= set(result)
    assert result["model"] == {"name": TEST_MODEL_NAME, "revision": TEST_REVISION}
    assert result["seed"] == 11
    [only] = result["images"]
    assert only["seed"] == 11
    assert base64.b64decode(only["image"]).startswith(b"\x89PNG")


def test_absent_seed_is_random_and_returned(warm: LoggedService) -> None:
    seeds = {warm({"prompt": "a fox", "num_inference_steps": 1})["seed"] for _ in range(3)}
    assert len(seeds) == 3
    assert all(0 <= seed < 2**32 for seed in seeds)


def test_defaults_come_from_the_model(warm: LoggedService) -> None:
    result = warm({"prompt": "a fox", "num_inference_steps": 1})
    # The tiny model's UNet samples 8x8 latents; the VAE scales by 8.
    assert (result["width"], result["height"]) == (64, 64)


def test_base64_body_is_accepted(warm: LoggedService) -> None:
    response = warm(
        url_event(
            body=REQUEST, base64_body=True, headers={"content-type": "application/x-www-form-urlencoded"}
        )
    )
    assert response["statusCode"] == 200


def test_health_reports_without_generating(warm: LoggedService) -> None:
    loads = warm.predictor.loads
    response = warm(url_event(method="GET", path="/health"))
    assert response["statusCode"] == 200
    health = body_json(response)
    assert health["model"] == TEST_MODEL_NAME
    assert health["revision"] == TEST_REVISION
    assert {"loaded", "threads", "dtype"} <= set(health)
    assert warm.predictor.loads == loads


def test_one_json_log_line_per_request(warm: LoggedService) -> None:
    before = len(warm.log_lines())
    warm(url_event(body={**REQUEST, "width": 32, "height": 40}))
    lines = warm.log_lines()[before:]
    assert len(lines) == 1
    line = lines[0]
    assert line["message"] == "request"
    assert line["outcome"] == "ok"
    assert line["revision"] == TEST_REVISION
    assert (line["steps"], line["width"], line["height"]) == (1, 32, 40)
    assert {"request_id", "load_ms", "inference_ms", "encode_ms", "total_ms"} <= set(line)


def test_model_loads_lazily_once_and_keeps_its_revision(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    paths = seed_release(root, "m", "r1", tiny_model_dir)
    service = LoggedService(Settings(model_root=root, model_name="m"))
    assert service.predictor.loads == 0  # nothing loaded before the first request
    assert service(REQUEST)["model"]["revision"] == "r1"
    seed_release_into(paths, "r2", tiny_model_dir)
    assert service(REQUEST)["model"]["revision"] == "r1"  # a warm environment keeps its revision
    assert service.predictor.loads == 1
    fresh = LoggedService(Settings(model_root=root, model_name="m"))
    assert fresh(REQUEST)["model"]["revision"] == "r2"  # a new environment picks up the switch


def test_the_cold_request_logs_how_far_the_prefetch_got(model_root: Path) -> None:
    settings = Settings(model_root=model_root, model_name=TEST_MODEL_NAME, accel="+prefetch")
    prefetch = prefetch_current(settings)
    assert prefetch is not None
    assert prefetch.wait(60)
    service = LoggedService(settings, Predictor(settings, prefetch=prefetch))
    service(url_event(body=REQUEST))
    service(url_event(body=REQUEST))
    cold, warm = service.log_lines()[-2:]
    assert cold["cold"] is True
    assert cold["prefetch"]["state"] == "done"
    assert cold["prefetch"]["read_bytes"] == prefetch.total_bytes
    assert warm["cold"] is False
    assert "prefetch" not in warm


def seed_release_into(paths: ModelPaths, revision: str, source: Path) -> None:
    seed_release(paths.model_dir.parent, paths.model_dir.name, revision, source)


def test_not_seeded_is_503_naming_the_expected_path(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = Settings(model_root=tmp_path / "models", model_name="absent")
    service = LoggedService(settings)
    response = service(url_event(body=REQUEST))
    assert response["statusCode"] == 503
    error = body_json(response)["error"]
    assert error["code"] == "model_not_seeded"
    assert str(tmp_path / "models" / "absent" / "current") in error["message"]
    health = service(url_event(method="GET", path="/health"))
    assert health["statusCode"] == 503
    assert body_json(health)["loaded"] is False
    # Seeding finishes later: the same environment recovers without a restart.
    seed_release(tmp_path / "models", "absent", "r1", tiny_model_dir)
    assert service(url_event(body=REQUEST))["statusCode"] == 200
    assert service.predictor.loads == 1


def test_current_pointing_at_an_empty_release_is_503(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "models" / "m")
    paths.release("r1").mkdir(parents=True)
    paths.switch_current("r1")
    response = LoggedService(Settings(model_root=tmp_path / "models", model_name="m"))(
        url_event(body=REQUEST)
    )
    assert response["statusCode"] == 503
    assert "model_index.json" in body_json(response)["error"]["message"]


def test_release_missing_weights_is_503_model_incomplete(tmp_path: Path, tiny_model_dir: Path) -> None:
    paths = seed_release(tmp_path / "models", "m", "r1", tiny_model_dir)
    for weights in (paths.release("r1") / "unet").glob("*.safetensors"):
        weights.unlink()
    response = LoggedService(Settings(model_root=tmp_path / "models", model_name="m"))(
        url_event(body=REQUEST)
    )
    assert response["statusCode"] == 503
    error = body_json(response)["error"]
    assert error["code"] == "model_incomplete"
    assert str(paths.release("r1")) in error["message"]


def test_pickle_weights_are_refused_with_503(tmp_path: Path, tiny_model_dir: Path) -> None:
    paths = seed_release(tmp_path / "models", "m", "r1", tiny_model_dir)
    (paths.release("r1") / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    response = LoggedService(Settings(model_root=tmp_path / "models", model_name="m"))(
        url_event(body=REQUEST)
    )
    assert response["statusCode"] == 503
    assert "pickle" in body_json(response)["error"]["message"]


def test_unexpected_exception_is_500_with_request_id_and_the_model_stays_warm(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = LoggedService(settings)
    assert service(url_event(body=REQUEST))["statusCode"] == 200
    original = Engine.generate

    def explode(self: Engine, params: object) -> object:
        raise RuntimeError("secret internal detail /opt/weights")

    monkeypatch.setattr(Engine, "generate", explode)
    response = service(url_event(body=REQUEST))
    assert response["statusCode"] == 500
    error = body_json(response)["error"]
    assert error["code"] == "internal_error"
    assert error["request_id"] == response["headers"]["x-request-id"]
    assert error["request_id"] in error["message"]
    assert "secret" not in response["body"]
    assert "Traceback" not in response["body"]
    line = service.log_lines()[-1]
    assert line["level"] == "ERROR"
    assert line["status"] == 500
    assert "secret internal detail" in line["exception"]
    assert "Traceback" in line["exception"]
    monkeypatch.setattr(Engine, "generate", original)
    assert service(url_event(body=REQUEST))["statusCode"] == 200
    assert service.predictor.loads == 1


def test_response_limit_falls_back_to_jpeg_then_413(settings: Settings) -> None:
    shared = Predictor(settings)
    roomy = LoggedService(settings, shared)(url_event(body={**REQUEST, "width": 256, "height": 256}))
    png_bytes = len(base64.b64decode(roomy["body"]))
    # A limit the PNG exceeds but a JPEG of the same image fits: the fallback is used and announced.
    from sd_lambda.serving.encoding import response_size

    tight = Settings(**{**settings.__dict__, "max_response_bytes": response_size(png_bytes) - 1})
    response = LoggedService(tight, shared)(url_event(body={**REQUEST, "width": 256, "height": 256}))
    assert response["statusCode"] == 200
    assert response["headers"]["content-type"] == "image/jpeg"
    assert response["headers"]["x-image-fallback"] == "png->jpeg"
    tiny = Settings(**{**settings.__dict__, "max_response_bytes": response_size(100)})
    response = LoggedService(tiny, shared)(url_event(body={**REQUEST, "width": 256, "height": 256}))
    assert response["statusCode"] == 413
    error = body_json(response)["error"]
    assert error["code"] == "response_too_large"
    assert "smaller width/height" in error["message"]
    assert shared.loads == 1


def test_handler_module_wires_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import sd_lambda.serving.handler as handler_module

    monkeypatch.setenv("MODEL_NAME", "from-env")
    try:
        reloaded = importlib.reload(handler_module)
        assert reloaded.SETTINGS.model_name == "from-env"
        assert reloaded.PREDICTOR.loads == 0
        assert callable(reloaded.handler)
    finally:
        monkeypatch.delenv("MODEL_NAME")
        importlib.reload(handler_module)


def test_a_direct_invoke_returns_several_images_and_health_lists_the_features(warm: LoggedService) -> None:
    result = warm({**REQUEST, "num_images": 2})
    assert [entry["seed"] for entry in result["images"]] == [11, 12]
    assert result["images"][0]["image"] != result["images"][1]["image"]
    line = warm.log_lines()[-1]
    assert (line["images"], line["seed"]) == (2, 11)
    health = body_json(warm(url_event(method="GET", path="/health")))
    assert "init_image" in health["features"]


def test_seeds_of_several_images_wrap_within_the_seed_space(warm: LoggedService) -> None:
    """Every seed a response reports can be sent back: the last 32-bit seed is followed by 0."""
    result = warm({**REQUEST, "seed": 2**32 - 1, "num_images": 2})
    assert [entry["seed"] for entry in result["images"]] == [2**32 - 1, 0]
    again = warm({**REQUEST, "seed": 0})

    def pixels(entry: dict) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["image"])))).astype(int)

    # Within the batch's rounding (a batch of two runs other kernels than a batch of one).
    assert np.abs(pixels(result["images"][1]) - pixels(again["images"][0])).max() <= 2


def test_init_image_is_unsupported_when_the_vae_encoder_was_freed(settings: Settings) -> None:
    service = LoggedService(Settings(**{**settings.__dict__, "accel": "+vae_encoder_drop"}))
    response = service(url_event(body={**REQUEST, "init_image": encoded(gradient(64, 64), "PNG")}))
    assert response["statusCode"] == 400
    error = body_json(response)["error"]
    assert (error["code"], error["field"]) == ("unsupported", "init_image")
    assert "torch engine" in error["message"]
    assert "vae_encoder_drop" in error["message"]
