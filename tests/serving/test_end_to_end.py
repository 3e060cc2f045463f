"""End to end: ``python -m awslambdaric sd_lambda.serving.handler.handler`` in a subprocess, exactly the
image's command, against the local Runtime API, with HTTP through the function URL front door.

Each environment start imports torch (seconds), so environments are module-scoped and few.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release
from PIL import Image

from sd_lambda.devtools.local.frontdoor import FrontDoor
from sd_lambda.devtools.local.httpio import fetch
from sd_lambda.devtools.local.launcher import LocalLambda

from .conftest import url_event

WAIT = 300  # an upper bound for a request on a busy two-core machine, never a pace
INJECTED = "raise an injected failure"
# Test-only: the function's interpreter imports this at start-up because it is on PYTHONPATH, so the
# failure is injected into the real process without any hook in production code.
BLOCKING = "wait for the test to release me"
# For BLOCKING, generate touches `entered` and then opens the FIFO `release` for reading, which blocks
# until the test opens it for writing: the test decides when the invocation ends, no timing involved.
SITECUSTOMIZE = f"""
import pathlib

import sd_lambda.engine.torch_engine as engine

_generate = engine.Engine.generate
_hooks = pathlib.Path(__file__).parent


def generate(self, params):
    if params.prompt == {INJECTED!r}:
        raise RuntimeError("injected failure in generate")
    if params.prompt == {BLOCKING!r}:
        (_hooks / "entered").touch()
        with open(_hooks / "release") as fifo:
            fifo.read()
    return _generate(self, params)


engine.Engine.generate = generate
"""


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict, bytes]:
    return fetch(method, url, json.dumps(body).encode() if body is not None else None, headers, WAIT)


class Served:
    def __init__(self, environment: LocalLambda, door: FrontDoor, log_path: Path) -> None:
        self.environment, self.door, self.log_path = environment, door, log_path
        self.hooks = log_path.parent

    def health(self) -> dict[str, Any]:
        status, _, body = http("GET", f"{self.door.url}/health")
        assert status == 200, body
        return json.loads(body)


@pytest.fixture(scope="module")
def served(module_model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    os.mkfifo(hooks / "release")
    log_path = hooks / "lambda.log"
    env = {"MODEL_ROOT": str(module_model_root), "MODEL_NAME": TEST_MODEL_NAME, "PYTHONPATH": str(hooks)}
    with (
        LocalLambda(env, timeout_s=WAIT, log_path=log_path) as environment,
        FrontDoor(environment.invoke, queue_size=8) as door,
    ):
        yield Served(environment, door, log_path)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def test_png_decodes_at_the_requested_size(served: Served) -> None:
    body = {"prompt": "a red fox", "num_inference_steps": 2, "width": 48, "height": 40, "seed": 3}
    status, headers, data = http("POST", f"{served.door.url}/", body)
    assert status == 200
    assert headers["content-type"] == "image/png"
    assert png(data).size == (48, 40)
    assert (headers["x-seed"], headers["x-model-revision"]) == ("3", TEST_REVISION)


def test_same_seed_gives_identical_bytes(served: Served) -> None:
    body = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 1234}
    first = http("POST", f"{served.door.url}/", body)
    second = http("POST", f"{served.door.url}/", body)
    other = http("POST", f"{served.door.url}/", {**body, "seed": 1235})
    assert first[0] == second[0] == other[0] == 200
    assert first[2] == second[2]
    assert first[2] != other[2]


def test_direct_invoke_returns_a_json_object(served: Served) -> None:
    result = served.environment.invoke({"prompt": "a fox", "num_inference_steps": 1, "seed": 5})
    assert result.ok
    value = json.loads(result.payload)
    assert {"images", "seed", "model", "timings"} <= set(value)
    assert value["seed"] == 5
    assert value["model"] == {"name": TEST_MODEL_NAME, "revision": TEST_REVISION}
    assert {"load", "inference", "encode"} <= set(value["timings"])
    assert [entry["seed"] for entry in value["images"]] == [5]
    assert png(base64.b64decode(value["images"][0]["image"])).size == (64, 64)


def test_function_url_event_through_the_runtime(served: Served) -> None:
    result = served.environment.invoke(url_event(body={"prompt": "x", "seed": -1}))
    response = json.loads(result.payload)
    assert response["statusCode"] == 400
    assert json.loads(response["body"])["error"]["code"] == "out_of_range"


def test_injected_exception_is_500_and_the_next_request_succeeds(served: Served) -> None:
    loads = served.health()["loads"]
    status, headers, body = http(
        "POST", f"{served.door.url}/", {"prompt": INJECTED, "num_inference_steps": 1}
    )
    assert status == 500
    error = json.loads(body)["error"]
    assert error["code"] == "internal_error"
    assert error["request_id"] == headers["x-request-id"]
    assert b"injected" not in body
    assert b"Traceback" not in body
    logged = [json.loads(line) for line in served.log_path.read_text().splitlines() if line.startswith("{")]
    failure = next(line for line in logged if line.get("request_id") == error["request_id"])
    assert failure["status"] == 500
    assert "injected failure in generate" in failure["exception"]
    status, _, data = http("POST", f"{served.door.url}/", {"prompt": "a fox", "num_inference_steps": 1})
    assert status == 200
    png(data)
    assert served.health()["loads"] == loads == 1
    assert served.environment.starts == 1


def test_eight_concurrent_requests_all_get_valid_images(served: Served) -> None:
    answers: dict[int, tuple[int, dict, bytes]] = {}

    def send(seed: int) -> None:
        answers[seed] = http(
            "POST", f"{served.door.url}/", {"prompt": "a fox", "num_inference_steps": 1, "seed": seed}
        )

    threads = [threading.Thread(target=send, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert sorted(answers) == list(range(8))
    for seed, (status, headers, data) in answers.items():
        assert status == 200
        assert headers["x-seed"] == str(seed)
        assert png(data).size == (64, 64)
    assert served.health()["loads"] == 1


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds, for at most WAIT seconds."""
    pause = threading.Event()
    for _ in range(WAIT * 20):
        if condition():
            return
        pause.wait(0.05)
    raise AssertionError("condition not reached")


def test_a_full_queue_answers_429_through_the_real_entrypoint(served: Served) -> None:
    answers: dict[str, tuple[int, dict, bytes]] = {}

    def send(name: str, prompt: str) -> None:
        answers[name] = http("POST", f"{door.url}/", {"prompt": prompt, "num_inference_steps": 1})

    with FrontDoor(served.environment.invoke, queue_size=1) as door:
        busy = threading.Thread(target=send, args=("busy", BLOCKING))
        busy.start()
        wait_until((served.hooks / "entered").exists)  # the function is inside generate
        queued = threading.Thread(target=send, args=("queued", "a fox"))
        queued.start()
        wait_until(lambda: door.waiting == 1)  # the second request waits in the queue
        status, headers, body = http("POST", f"{door.url}/", {"prompt": "one too many"})
        assert status == 429
        assert int(headers["retry-after"]) >= 1
        assert json.loads(body)["error"]["code"] == "queue_full"
        with open(served.hooks / "release", "w") as fifo:  # let the function finish
            fifo.write("go")
        (served.hooks / "entered").unlink()
        busy.join(WAIT)
        queued.join(WAIT)
    assert answers["busy"][0] == answers["queued"][0] == 200
    png(answers["busy"][2])
    png(answers["queued"][2])
    assert served.environment.starts == 1


def test_cold_start_log_has_no_progress_bars_and_engine_lines_are_json(served: Served) -> None:
    assert served.health()["loaded"]
    text = served.log_path.read_text()
    assert "Loading pipeline components" not in text
    assert "it/s]" not in text
    logged = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("engine threads=") for line in logged)


def test_health_through_the_front_door(served: Served) -> None:
    health = served.health()
    assert health["model"] == TEST_MODEL_NAME
    assert health["revision"] == TEST_REVISION
    assert {"threads", "dtype", "loaded"} <= set(health)


def test_missing_current_is_503_until_seeded(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = tmp_path / "models"
    env = {"MODEL_ROOT": str(root), "MODEL_NAME": "late"}
    with (
        LocalLambda(env, timeout_s=WAIT, log_path=tmp_path / "lambda.log") as environment,
        FrontDoor(environment.invoke) as door,
    ):
        status, _, body = http("POST", f"{door.url}/", {"prompt": "a fox", "num_inference_steps": 1})
        assert status == 503
        error = json.loads(body)["error"]
        assert error["code"] == "model_not_seeded"
        assert str(root / "late" / "current") in error["message"]
        seed_release(root, "late", "r9", tiny_model_dir)
        status, headers, _ = http("POST", f"{door.url}/", {"prompt": "a fox", "num_inference_steps": 1})
        assert status == 200
        assert headers["x-model-revision"] == "r9"
        assert environment.starts == 1


def test_init_error_is_reported_and_the_next_invoke_starts_a_fresh_environment(tmp_path: Path) -> None:
    with LocalLambda(
        handler="sd_lambda.no_such_module.handler", log_path=tmp_path / "lambda.log"
    ) as environment:
        result = environment.invoke({"prompt": "x"})
        assert result.error_type == "Runtime.ImportModuleError"
        assert "no_such_module" in result.error["errorMessage"]
        starts = environment.starts
        assert environment.invoke({"prompt": "x"}).error_type == "Runtime.ImportModuleError"
        assert environment.starts == starts + 1


def test_a_malformed_setting_fails_init_naming_the_variable(tmp_path: Path) -> None:
    with LocalLambda({"SD_MAX_STEPS": "many"}, log_path=tmp_path / "lambda.log") as environment:
        result = environment.invoke({"prompt": "x"})
    assert result.error_type == "ValueError"
    assert "SD_MAX_STEPS='many'" in result.error["errorMessage"]


def test_several_images_come_back_as_a_json_list_one_seed_each(served: Served) -> None:
    body = {"prompt": "three foxes", "num_inference_steps": 2, "seed": 40, "num_images": 3}
    status, headers, data = http("POST", f"{served.door.url}/", body, {"accept": "application/json"})
    assert status == 200, data
    assert headers["content-type"] == "application/json"
    value = json.loads(data)
    assert value["seed"] == 40
    assert [entry["seed"] for entry in value["images"]] == [40, 41, 42]
    images = [png(base64.b64decode(entry["image"])) for entry in value["images"]]
    assert [image.size for image in images] == [(64, 64)] * 3
    # The third image is what a one-image request with its seed returns.
    _, _, alone = http("POST", f"{served.door.url}/", {**body, "num_images": 1, "seed": 42})
    # (a batched matmul may sum in another order: within a small tolerance)
    assert max(abs(a - b) for a, b in zip(images[2].tobytes(), png(alone).tobytes(), strict=True)) <= 2
    # As binary: refused before any work, saying to ask for JSON.
    status, _, data = http("POST", f"{served.door.url}/", body)
    assert status == 400
    assert json.loads(data)["error"]["code"] == "needs_json"


def test_image_to_image_starts_from_the_given_image(served: Served) -> None:
    ramp = bytes(range(0, 256, 4)) * 64 * 3
    start = Image.frombytes("RGB", (64, 64), ramp[: 64 * 64 * 3])
    buffer = io.BytesIO()
    start.rotate(90).save(buffer, format="PNG")
    request = {
        "prompt": "a fox",
        "init_image": base64.b64encode(buffer.getvalue()).decode(),
        "num_inference_steps": 4,
        "seed": 9,
    }
    results = {}
    for strength in (0.0, 0.5, 1.0):
        status, _, data = http(
            "POST", f"{served.door.url}/", {**request, "strength": strength}, {"accept": "application/json"}
        )
        assert status == 200, data
        value = json.loads(data)
        assert (value["strength"], value["width"], value["height"]) == (strength, 64, 64)
        results[strength] = png(base64.b64decode(value["images"][0]["image"])).tobytes()

    def distance(a: bytes, b: bytes) -> float:
        return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)

    assert 0 < distance(results[0.0], results[0.5]) < distance(results[0.0], results[1.0])
    # The default strength is documented as 0.8.
    status, _, data = http("POST", f"{served.door.url}/", request, {"accept": "application/json"})
    assert json.loads(data)["strength"] == 0.8
