"""An OpenVINO release through the real handler: same request, same response shape, same errors."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release
from PIL import Image

from sd_lambda.settings import Settings

from .conftest import LoggedService, body_json, url_event

REQUEST = {"prompt": "a red fox", "num_inference_steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def service(tiny_openvino_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoggedService:
    root = tmp_path_factory.mktemp("models")
    seed_release(root, TEST_MODEL_NAME, TEST_REVISION, tiny_openvino_model_dir)
    cache = tmp_path_factory.mktemp("openvino-cache")
    return LoggedService(Settings(model_root=root, model_name=TEST_MODEL_NAME, openvino_cache_dir=str(cache)))


def test_generates_an_image_with_the_usual_headers_and_log(service: LoggedService) -> None:
    response = service(url_event(body={**REQUEST, "scheduler": "pndm", "decoder": "full"}))
    assert response["statusCode"] == 200, response["body"]
    assert response["headers"]["content-type"] == "image/png"
    assert response["headers"]["x-model-revision"] == TEST_REVISION
    image = Image.open(io.BytesIO(base64.b64decode(response["body"])))
    assert image.size == (64, 64)
    line = service.log_lines()[-1]
    assert (line["outcome"], line["scheduler"], line["decoder"]) == ("ok", "pndm", "full")
    assert "unet_ms" in line
    assert "compile_ms" in line


def test_health_names_the_engine_and_what_it_offers(service: LoggedService) -> None:
    health = body_json(service(url_event(method="GET", path="/health")))
    assert health["loaded"] is True
    assert (health["engine"], health["default_scheduler"], health["default_decoder"]) == (
        "openvino",
        "euler",
        "tiny",
    )
    assert "dpmpp_2m" in health["unavailable_schedulers"]


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "ddim"])
def test_a_scheduler_this_engine_cannot_run_is_a_400_naming_the_ones_it_can(
    service: LoggedService, scheduler: str
) -> None:
    response = service(url_event(body={**REQUEST, "scheduler": scheduler}))
    assert response["statusCode"] == 400
    error = body_json(response)["error"]
    assert error["field"] == "scheduler"
    assert "euler" in error["message"]
    assert scheduler not in error["message"].split("available")[-1]


def test_forcing_torch_on_an_openvino_release_is_503_naming_both(
    tiny_openvino_model_dir: Path, tmp_path: Path
) -> None:
    seed_release(tmp_path / "models", "m", "r1", tiny_openvino_model_dir)
    forced = LoggedService(Settings(model_root=tmp_path / "models", model_name="m", engine="torch"))
    response = forced(url_event(body=REQUEST))
    assert response["statusCode"] == 503
    error = body_json(response)["error"]
    assert error["code"] == "model_incomplete"
    assert "SD_ENGINE=torch" in error["message"]
    assert "OpenVINO IR" in error["message"]


def test_a_truncated_ir_is_503_model_incomplete(tiny_openvino_model_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_openvino_model_dir, tmp_path / "copy")
    weights = copy / "unet" / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[:64])
    seed_release(tmp_path / "models", "m", "r1", copy)
    broken = LoggedService(
        Settings(model_root=tmp_path / "models", model_name="m", openvino_cache_dir="none")
    )
    response = broken(url_event(body=REQUEST))
    assert response["statusCode"] == 503
    assert body_json(response)["error"]["code"] == "model_incomplete"
    assert broken.predictor.loads == 0


def test_a_small_image_is_served_as_on_torch(service: LoggedService) -> None:
    # 16x8 px: a latent of 8 elements, drawn by torch's scalar path (sd_lambda.engine.torch_noise).
    response = service(url_event(body={**REQUEST, "width": 16, "height": 8}))
    assert response["statusCode"] == 200, response["body"]
    assert Image.open(io.BytesIO(base64.b64decode(response["body"]))).size == (16, 8)


def test_a_release_pruned_under_a_warm_environment_is_503_for_a_new_shape(
    tiny_openvino_model_dir: Path, tmp_path: Path
) -> None:
    seed_release(tmp_path / "models", "m", "r1", tiny_openvino_model_dir)
    warm = LoggedService(Settings(model_root=tmp_path / "models", model_name="m", openvino_cache_dir="none"))
    assert warm(url_event(body=REQUEST))["statusCode"] == 200
    shutil.rmtree(tmp_path / "models" / "m" / "releases" / "r1")
    response = warm(url_event(body={**REQUEST, "width": 96}))
    assert response["statusCode"] == 503
    error = body_json(response)["error"]
    assert error["code"] == "model_incomplete"
    assert "cannot compile 96x64" in error["message"]
