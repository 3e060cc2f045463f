"""Load-path correctness: budget before load, corrupt weights, revision naming, model defaults vs limits,
one generation at a time, Retry-After, Accept q-values, and a request model that needs its settings."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import seed_release

from sd_lambda.devtools.local.models import as_efs_layout
from sd_lambda.engine.generation import GenerationParams
from sd_lambda.engine.torch_engine import Engine
from sd_lambda.serving.events import HttpRequest, wants_json
from sd_lambda.serving.predictor import Predictor
from sd_lambda.serving.request import GenerationRequest
from sd_lambda.settings import Settings

from .conftest import LoggedService, body_json, url_event

REQUEST = {"prompt": "a red fox", "num_inference_steps": 1, "seed": 3}
WAIT = 300  # an upper bound on a busy machine, never a pace


def test_pixel_budget_is_refused_before_any_load_even_when_unseeded(tmp_path: Path) -> None:
    service = LoggedService(Settings(model_root=tmp_path / "empty", model_name="absent"))
    response = service(url_event(body={**REQUEST, "width": 1024, "height": 1024}))
    assert response["statusCode"] == 400
    error = body_json(response)["error"]
    assert (error["code"], error["field"]) == ("too_many_pixels", "width")
    assert "SD_MAX_PIXELS" in error["message"]
    assert service.predictor.loads == 0
    assert not service.predictor.loaded


def test_request_model_refuses_to_validate_without_settings() -> None:
    with pytest.raises(TypeError, match="context"):
        GenerationRequest.model_validate({"prompt": "x", "width": 64})


def test_corrupt_safetensors_is_503_model_incomplete(tmp_path: Path, tiny_model_dir: Path) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    weights = sorted((copy / "text_encoder").glob("*.safetensors"))
    assert weights
    for path in weights:
        path.write_bytes(path.read_bytes()[:100])
    seed_release(tmp_path / "models", "m", "r1", copy)
    service = LoggedService(Settings(model_root=tmp_path / "models", model_name="m"))
    response = service(url_event(body=REQUEST))
    assert response["statusCode"] == 503, response["body"]
    error = body_json(response)["error"]
    assert error["code"] == "model_incomplete"
    assert "text_encoder" in error["message"] or "SafetensorError" in error["message"]


def test_not_seeded_503_carries_retry_after(tmp_path: Path) -> None:
    service = LoggedService(Settings(model_root=tmp_path / "models", model_name="absent"))
    response = service(url_event(body=REQUEST))
    assert response["statusCode"] == 503
    assert int(response["headers"]["retry-after"]) > 0


def test_revision_is_the_link_name_before_and_after_load(tmp_path: Path, tiny_model_dir: Path) -> None:
    # A plain folder wrapped for `make serve`: releases/<slug> is itself a link to a differently named folder.
    alias = tmp_path / "fancy-model"
    alias.symlink_to(tiny_model_dir, target_is_directory=True)
    paths = as_efs_layout(alias, tmp_path / "cache")
    revision = paths.current_revision()
    assert revision != tiny_model_dir.name
    service = LoggedService(Settings(model_root=paths.model_dir.parent, model_name=paths.model_dir.name))
    before = body_json(service(url_event(method="GET", path="/health")))["revision"]
    response = service(url_event(body=REQUEST))
    assert response["statusCode"] == 200
    after = body_json(service(url_event(method="GET", path="/health")))["revision"]
    assert before == after == response["headers"]["x-model-revision"] == revision


def test_model_defaults_outside_the_limits_are_an_operator_error(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    (copy / "sd-lambda-defaults.json").write_text(json.dumps({"height": 1024, "num_inference_steps": 1}))
    seed_release(tmp_path / "models", "m", "r1", copy)
    service = LoggedService(Settings(model_root=tmp_path / "models", model_name="m", max_side=512))
    response = service(url_event(body={"prompt": "a fox", "width": 64}))
    assert response["statusCode"] == 503
    error = body_json(response)["error"]
    assert (error["code"], error["field"]) == ("model_config", "height")
    assert "model's default height" in error["message"]
    assert "between 8 and 512" in error["message"]
    logged = [line for line in service.log_lines() if line.get("default_problems")]
    assert logged
    assert "height" in logged[0]["default_problems"]
    # Only requests that rely on the broken default fail; the model stays loaded for the rest.
    ok = service(url_event(body={"prompt": "a fox", "width": 64, "height": 64}))
    assert ok["statusCode"] == 200
    assert service.predictor.loads == 1


class BlockingEngine:
    """Wraps a real engine; ``generate`` reports entry and waits for the test to release it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.defaults, self.schedulers, self.decoders = engine.defaults, engine.schedulers, engine.decoders
        self.features, self.adapters, self.describe = engine.features, engine.adapters, engine.describe
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.active = self.most_active = 0
        self._count = threading.Lock()

    def generate(self, params: GenerationParams) -> Any:
        with self._count:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.entered.release()
        assert self.release.wait(WAIT)
        try:
            return self._engine.generate(params)
        finally:
            with self._count:
                self.active -= 1


def test_two_requests_never_generate_at_the_same_time(settings: Settings) -> None:
    blocking = BlockingEngine(Engine.load(settings.model_dir / "current", settings))
    predictor = Predictor(settings, loader=lambda folder, loaded_settings: blocking)  # type: ignore[arg-type,return-value]
    service = LoggedService(settings, predictor)
    answers: list[int] = []
    threads = [
        threading.Thread(target=lambda: answers.append(service(url_event(body=REQUEST))["statusCode"]))
        for _ in range(2)
    ]
    threads[0].start()
    assert blocking.entered.acquire(timeout=WAIT)
    # The first request is inside generate and holds the predictor's lock: nobody else can get in.
    assert not predictor._lock.acquire(blocking=False)
    threads[1].start()
    blocking.release.set()
    for thread in threads:
        thread.join(WAIT)
    assert answers == [200, 200]
    assert blocking.most_active == 1
    assert predictor.loads == 1


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/json", True),
        ("application/json;q=0", False),
        ("application/json; q=0.0, image/png", False),
        ("image/png;q=0.5, application/json", True),
        ("image/png, application/json;q=0.5", False),
        ("*/*", False),
        ("", False),
    ],
)
def test_accept_header_q_values(accept: str, expected: bool) -> None:
    assert wants_json(HttpRequest("POST", "/", {"accept": accept}, b"")) is expected


def test_model_default_problems_names_every_default_outside_the_limits() -> None:
    from sd_lambda.engine.generation import ModelDefaults
    from sd_lambda.serving.request import model_default_problems

    assert model_default_problems(ModelDefaults(512, 512, 1, 0.0), Settings()) == {}
    problems = model_default_problems(ModelDefaults(1024, 1024, 60, 7.5), Settings())
    assert set(problems) == {"num_inference_steps", "width", "height"}
    assert "SD_MAX_PIXELS" in problems["width"]
    assert set(model_default_problems(ModelDefaults(2048, 1024), Settings())) == {"width"}
