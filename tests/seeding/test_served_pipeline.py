"""Seeding takes only what the engine serves: its pipeline classes (#21 item 9), the components it loads, and
hub failures as one line naming the repo (#21 item 8)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import httpx as hub_http

from sd_lambda.seeding import sources
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.pipeline import SERVED_COMPONENTS, SERVED_PIPELINE_CLASSES
from sd_lambda.seeding.sources import check_dir, from_dir, from_hub

from .conftest import make_model
from .test_sources import COMMIT, FakeHub, install_fake_hub

SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
REFUSED = (
    "model_index.json names 'StableDiffusionXLPipeline', which the engine cannot serve (it serves "
    "StableDiffusionPipeline and LatentConsistencyModelPipeline: Stable Diffusion 1.x/2.x-style models)"
)


def _with_index(folder: Path, **changes: Any) -> Path:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# --- pipeline classes (item 9) --------------------------------------------------------------------


def test_a_folder_of_another_pipeline_is_refused_before_its_weights_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_model(tmp_path / "sdxl", "v1")
    (folder / "model_index.json").write_text(json.dumps(SDXL_INDEX))
    monkeypatch.setattr(sources, "sha256_file", lambda path: pytest.fail(f"hashed {path}"))
    with pytest.raises(SeedError) as caught:
        from_dir(folder)
    assert str(caught.value) == f"{folder}: {REFUSED}"
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(SeedError, match=r"model_index\.json is not JSON"):
        check_dir(folder)


@pytest.mark.parametrize("name", SERVED_PIPELINE_CLASSES)
def test_the_served_classes_pass(tmp_path: Path, name: str) -> None:
    folder = make_model(tmp_path / "m", "v1")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
    assert "unet/part0.safetensors" in check_dir(folder)


def test_the_served_classes_load_as_the_engine_loads_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The engine calls StableDiffusionPipeline.from_pretrained on every folder: each class seeding lets
    through has exactly its components (so none is silently dropped), and what it leaves optional is what
    seeding does not fetch."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    expected = set(StableDiffusionPipeline._get_signature_keys(StableDiffusionPipeline)[0])
    for cls in (StableDiffusionPipeline, LatentConsistencyModelPipeline):
        assert cls.__name__ in SERVED_PIPELINE_CLASSES
        assert set(cls._get_signature_keys(cls)[0]) == expected
    optional = set(StableDiffusionPipeline._optional_components)
    assert expected - optional == set(SERVED_COMPONENTS)
    assert len(SERVED_PIPELINE_CLASSES) == 2


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path) -> FakeHub:
    return install_fake_hub(monkeypatch, tiny_model_dir, tmp_path)


def test_a_hub_pipeline_of_another_class_is_refused_after_model_index_only(
    hub: FakeHub, tmp_path: Path
) -> None:
    repo = hub.repos["acme/sdxl"] = tmp_path / "sdxl"
    shutil.copytree(hub.repos["acme/tiny-sd"], repo)
    (repo / "model_index.json").write_text(json.dumps(SDXL_INDEX))
    with pytest.raises(SeedError) as caught:
        from_hub("acme/sdxl", tmp_path / "work")
    assert str(caught.value) == f"acme/sdxl on the hub: {REFUSED}"
    assert hub.downloads == [("acme/sdxl", COMMIT, ["model_index.json"])]  # no weights moved


# --- only the components the engine loads (item 8) ----------------------------------------------


def test_hub_seeding_fetches_only_the_components_the_engine_loads(hub: FakeHub, tmp_path: Path) -> None:
    """An SD 1.5-shaped repo lists a safety checker and a feature extractor: neither is fetched, and the
    release's model_index.json marks them absent, so the folder loads as the engine loads it."""
    repo = hub.repos["acme/tiny-sd"]
    _with_index(
        repo,
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        requires_safety_checker=True,
    )
    (repo / "safety_checker").mkdir()
    (repo / "safety_checker" / "config.json").write_text("{}")
    (repo / "safety_checker" / "model.safetensors").write_bytes(b"1.2 GB in real life")
    (repo / "feature_extractor").mkdir()
    (repo / "feature_extractor" / "preprocessor_config.json").write_text("{}")

    release = from_hub("acme/tiny-sd", tmp_path / "work")
    downloaded = {name for _, _, names in hub.downloads for name in names}
    assert {name.split("/")[0] for name in downloaded if "/" in name} == set(SERVED_COMPONENTS)
    assert {path.split("/")[0] for path in release.files if "/" in path} == set(SERVED_COMPONENTS)
    # One precision per component: the plain weights, not the fp16 variant beside them.
    unet_weights = [p for p in release.files if p.startswith("unet/") and p.endswith(".safetensors")]
    assert unet_weights == ["unet/diffusion_pytorch_model.safetensors"]
    index = json.loads(release.files["model_index.json"].read_text())
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == [None, None]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    # The repo's own model_index.json is untouched (the rewritten one lives beside the download).
    assert json.loads((repo / "model_index.json").read_text())["feature_extractor"][0] == "transformers"

    from diffusers import StableDiffusionPipeline

    staged = tmp_path / "staged"
    for path, local in release.files.items():
        (staged / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, staged / path)
    pipeline = StableDiffusionPipeline.from_pretrained(
        staged, use_safetensors=True, safety_checker=None, requires_safety_checker=False
    )
    assert pipeline.feature_extractor is None


# --- hub failures are one line naming the repo (item 8) -------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_refused_connection_is_one_line_naming_the_repo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real hub client against a port nothing listens on: httpx2's ConnectError is no OSError."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(sources, "HfApi", lambda: HfApi(endpoint=endpoint))
    with pytest.raises(SeedError) as caught:
        from_hub("acme/tiny-sd", tmp_path / "work")
    message = str(caught.value)
    assert message.startswith("cannot reach the hub for acme/tiny-sd: ")
    assert "Connection refused" in message
    assert message.endswith("(network, proxy or HF_ENDPOINT?)")
    assert "\n" not in message


def _request() -> hub_http.Request:
    return hub_http.Request("GET", "https://huggingface.co/api/models/acme/tiny-sd")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            lambda: hub_http.ConnectError("[Errno -2] Name or service not known", request=_request()),
            "cannot reach the hub for acme/tiny-sd@v1: [Errno -2] Name or service not known "
            "(network, proxy or HF_ENDPOINT?)",
        ),
        (
            lambda: hub_http.ReadTimeout("The read operation timed out", request=_request()),
            "the hub did not answer in time for acme/tiny-sd@v1: The read operation timed out "
            "(network/proxy?)",
        ),
        (
            lambda: HfHubHTTPError(
                "401 Client Error: Unauthorized\nInvalid credentials in Authorization header",
                response=hub_http.Response(401, request=_request()),
            ),
            "the hub refused access to acme/tiny-sd@v1 (HTTP 401): check HF_TOKEN",
        ),
        (
            lambda: HfHubHTTPError(
                "500 Server Error\nsomething broke", response=hub_http.Response(500, request=_request())
            ),
            "the hub could not serve acme/tiny-sd@v1: 500 Server Error",
        ),
    ],
)
def test_hub_failures_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Any, message: str
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error()

    monkeypatch.setattr(sources, "HfApi", lambda: SimpleNamespace(model_info=fail))
    with pytest.raises(SeedError) as caught:
        from_hub("acme/tiny-sd@v1", tmp_path / "work")
    assert str(caught.value) == message


def test_make_seed_models_refuses_another_pipeline_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sd_lambda.cli import main
    from sd_lambda.seeding import flow

    monkeypatch.setattr(flow.AwsClients, "create", lambda region: pytest.fail("AWS asked"))
    folder = make_model(tmp_path / "sdxl", "v1")
    (folder / "model_index.json").write_text(json.dumps(SDXL_INDEX))
    stack = ["--bucket", "b", "--instance-id", "i-1", "--region", "eu-west-1", "--name", "m"]
    assert main(["seed", "--from-dir", str(folder), *stack]) == 1
    assert capsys.readouterr().err.strip() == f"sd-lambda seed: error: {folder}: {REFUSED}"


def test_an_uploaded_revision_of_another_pipeline_is_refused_before_the_seeder(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    import boto3
    from moto import mock_aws

    from sd_lambda.seeding import flow
    from sd_lambda.seeding.target import Target

    with mock_aws():
        clients = flow.AwsClients.create("us-east-1")
        clients.s3.create_bucket(Bucket="weights")
        target = Target(bucket="weights", instance_id="i-1", region="us-east-1")
        release = from_dir(make_model(tmp_path / "m", "v1"))
        flow.stage_local(clients, target, release, "m", "r1", progress=False)
        assert flow.stage_s3(clients, "s3://weights/models/m/r1/").revision == "r1"
        # Someone uploaded an SDXL revision by hand (the manifest lists a model_index.json; its class is
        # what counts).
        boto3.client("s3", region_name="us-east-1").put_object(
            Bucket="weights", Key="models/m/r1/model_index.json", Body=json.dumps(SDXL_INDEX).encode()
        )
        with pytest.raises(SeedError) as caught:
            flow.stage_s3(clients, "s3://weights/models/m/r1/")
    assert str(caught.value) == f"s3://weights/models/m/r1/: {REFUSED}"
