"""The OpenVINO engine on the tiny test model exported to OpenVINO IR by the real exporter (offline):
choice of engine, load, parity with the torch engine, schedulers, decoders, compiled shapes, cache."""

from __future__ import annotations

import json
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from sd_lambda.engine import backend, openvino_engine
from sd_lambda.engine.generation import GenerationParams
from sd_lambda.engine.openvino_engine import OpenVINOEngine, choose_cache_dir, choose_precision
from sd_lambda.engine.torch_engine import Engine
from sd_lambda.layout import LayoutError
from sd_lambda.settings import Settings

FP32 = Settings(dtype="float32", accel="none")
# The same request on both engines: one seed (the OpenVINO engine draws torch's numbers), one scheduler,
# guidance on, the release's weights stored as fp16 (the export's default) or fp32. Measured on the
# random-weight tiny model: PSNR ~51 dB (full decoder) and ~56 dB (tiny decoder), mean absolute difference
# under 1 of 255, the same for either storage (fp16 against fp32: ~64 dB); the bounds leave room for other
# CPUs' kernels.
PARITY_MIN_PSNR_DB = 30.0
PARITY_MAX_MEAN_ABS = 4.0


def params(**overrides: object) -> GenerationParams:
    values: dict[str, object] = {
        "prompt": "a red fox in the snow",
        "num_inference_steps": 4,
        "guidance_scale": 7.5,
        "width": 64,
        "height": 64,
        "seed": 42,
    }
    values.update(overrides)
    return GenerationParams(**values)  # type: ignore[arg-type]


def pixels(image: object) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def ov_engine(tiny_openvino_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OpenVINOEngine:
    cache = tmp_path_factory.mktemp("openvino-cache")
    return OpenVINOEngine.load(
        tiny_openvino_model_dir, Settings(dtype="float32", openvino_cache_dir=str(cache))
    )


@pytest.fixture(scope="module")
def ov_fp32_engine(tiny_openvino_fp32_model_dir: Path) -> OpenVINOEngine:
    return OpenVINOEngine.load(
        tiny_openvino_fp32_model_dir, Settings(dtype="float32", openvino_cache_dir="none")
    )


@pytest.fixture(scope="module")
def torch_engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir, FP32)


def test_auto_picks_the_engine_by_what_the_release_holds(
    tiny_openvino_model_dir: Path, tiny_model_dir: Path
) -> None:
    assert backend.engine_for(tiny_openvino_model_dir, Settings())[0] == "openvino"
    assert backend.engine_for(tiny_model_dir, Settings())[0] == "torch"
    assert backend.engine_for(tiny_model_dir, Settings(engine="torch")) == ("torch", "SD_ENGINE=torch")


def test_a_forced_engine_refuses_the_other_engines_release(
    tiny_openvino_model_dir: Path, tiny_model_dir: Path
) -> None:
    with pytest.raises(LayoutError, match=r"SD_ENGINE=torch but .* holds OpenVINO IR .*SD_ENGINE=auto"):
        backend.load_engine(tiny_openvino_model_dir, Settings(engine="torch"))
    with pytest.raises(LayoutError, match=r"SD_ENGINE=openvino but .* holds safetensors weights"):
        backend.load_engine(tiny_model_dir, Settings(engine="openvino"))


def test_load_describes_what_it_chose(ov_engine: OpenVINOEngine) -> None:
    described = ov_engine.describe()
    assert described["engine"] == "openvino"
    assert described["dtype"] == "float32"
    assert described["decoders"] == ["full", "tiny"]
    assert described["default_decoder"] == "tiny"
    # The model's PNDM becomes Euler at 20 steps (GenAI has no DPM-Solver++).
    assert described["default_scheduler"] == "euler"
    assert ov_engine.defaults.num_inference_steps == 20
    assert "dpmpp_2m" not in described["schedulers"]
    assert described["unavailable_schedulers"]["dpmpp_2m"] == "OpenVINO GenAI has no such scheduler"
    # The tiny model's scheduler config leaves clip_sample at diffusers' default (on): GenAI's DDIM
    # would refuse it at generation time, so it is not offered.
    assert "clip_sample" in described["unavailable_schedulers"]["ddim"]
    assert set(described["schedulers"]) == {"pndm", "euler", "euler_a", "lcm"}
    # The default shape (64x64, guided) is compiled by the load, before any request.
    assert described["compiled_shapes"] == [[64, 64, True]]


# Euler ancestral and LCM draw fresh noise every step, from the same seeded stream as the latents.
@pytest.mark.parametrize("stored", ["fp16", "fp32"])
@pytest.mark.parametrize(
    ("scheduler", "decoder"), [("euler", "full"), ("euler", "tiny"), ("euler_a", "full"), ("lcm", "full")]
)
def test_same_request_matches_the_torch_engine(
    request: pytest.FixtureRequest, torch_engine: Engine, stored: str, scheduler: str, decoder: str
) -> None:
    ov_engine = request.getfixturevalue("ov_engine" if stored == "fp16" else "ov_fp32_engine")
    same = params(scheduler=scheduler, decoder=decoder)
    ours = pixels(ov_engine.generate(same).images[0])
    theirs = pixels(torch_engine.generate(same).images[0])
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert psnr(ours, theirs) >= PARITY_MIN_PSNR_DB
    assert np.abs(ours - theirs).mean() <= PARITY_MAX_MEAN_ABS
    # And not trivially: another seed is another image (the random tiny decoder saturates much of it).
    other = pixels(ov_engine.generate(params(scheduler=scheduler, decoder=decoder, seed=43)).images[0])
    assert np.abs(ours - other).max() > 8 * np.abs(ours - theirs).mean()


def test_scheduler_switch_takes_effect(ov_engine: OpenVINOEngine) -> None:
    euler = ov_engine.generate(params(scheduler="euler"))
    pndm = ov_engine.generate(params(scheduler="pndm"))
    again = ov_engine.generate(params(scheduler="euler"))
    assert (euler.stats["scheduler"], pndm.stats["scheduler"]) == ("EulerDiscreteScheduler", "PNDMScheduler")
    # PNDM (PLMS with skip_prk_steps) spends one more UNet call than its steps; Euler does not.
    assert (euler.stats["unet_calls"], pndm.stats["unet_calls"]) == (4, 5)
    assert psnr(pixels(euler.images[0]), pixels(pndm.images[0])) < 60
    np.testing.assert_array_equal(pixels(euler.images[0]), pixels(again.images[0]))


def test_unavailable_scheduler_and_decoder_are_value_errors(ov_engine: OpenVINOEngine) -> None:
    with pytest.raises(ValueError, match=r"unknown scheduler 'dpmpp_2m'; available: pndm, euler"):
        ov_engine.generate(params(scheduler="dpmpp_2m"))
    with pytest.raises(ValueError, match="decoder 'huge' is not available"):
        ov_engine.generate(params(decoder="huge"))


def test_guidance_off_runs_batch_one_and_negative_prompt_counts(ov_engine: OpenVINOEngine) -> None:
    unguided = ov_engine.generate(params(guidance_scale=1.0, scheduler="euler"))
    assert (unguided.stats["guided"], unguided.stats["unet_batch"]) == (False, 1)
    plain = ov_engine.generate(params(scheduler="euler"))
    negative = ov_engine.generate(params(scheduler="euler", negative_prompt="blurry"))
    assert psnr(pixels(plain.images[0]), pixels(negative.images[0])) < 60


def test_compiled_shapes_are_kept_up_to_the_setting_oldest_first(tiny_openvino_model_dir: Path) -> None:
    engine = OpenVINOEngine.load(
        tiny_openvino_model_dir, Settings(openvino_compiled_sizes=2, openvino_cache_dir="none")
    )
    wide = engine.generate(params(width=96, decoder="full"))
    assert wide.images[0].size == (96, 64)
    assert wide.stats["compiled"] is True
    assert engine.generate(params(width=96, decoder="full")).stats["compiled"] is False
    assert engine.describe()["compiled_shapes"] == [[64, 64, True], [96, 64, True]]
    # A third shape drops the least recently used one (64x64), which then compiles again.
    engine.generate(params(height=96))
    assert engine.describe()["compiled_shapes"] == [[96, 64, True], [64, 96, True]]
    assert engine.generate(params()).stats["compiled"] is True


def test_compile_cache_is_written_under_the_setting(tiny_openvino_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    engine = OpenVINOEngine.load(tiny_openvino_model_dir, Settings(openvino_cache_dir=str(cache)))
    assert engine.describe()["compile_cache"] == str(cache)
    assert any(cache.iterdir()), "OpenVINO wrote no compiled model into CACHE_DIR"


def test_compile_cache_is_off_when_disabled_or_when_the_disk_is_too_small(
    tiny_openvino_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert choose_cache_dir(Settings(openvino_cache_dir="none"), tiny_openvino_model_dir) == (
        None,
        "SD_OPENVINO_CACHE_DIR=none",
    )
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(openvino_engine.shutil, "disk_usage", lambda path: usage(512, 512, 0))
    folder, reason = choose_cache_dir(Settings(openvino_cache_dir=str(tmp_path)), tiny_openvino_model_dir)
    assert folder is None
    assert "raise ephemeral_storage_size" in reason


def test_precision_follows_the_cpu_unless_overridden() -> None:
    assert choose_precision(Settings(), frozenset({"avx2"}))[0] == "f32"
    assert choose_precision(Settings(), frozenset({"avx2", "avx512_bf16"}))[0] == "bf16"
    assert choose_precision(Settings(dtype="float32"), frozenset({"amx_bf16"})) == ("f32", "SD_DTYPE=float32")


def test_pickles_in_an_openvino_release_are_refused(tiny_openvino_model_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_openvino_model_dir, tmp_path / "copy")
    (copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(LayoutError, match=r"refusing pickle weights .*unet/diffusion_pytorch_model\.bin"):
        OpenVINOEngine.load(copy, Settings())


def test_a_truncated_ir_is_a_layout_error(tiny_openvino_model_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_openvino_model_dir, tmp_path / "copy")
    weights = copy / "unet" / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(LayoutError, match="cannot load the OpenVINO release"):
        OpenVINOEngine.load(copy, Settings(openvino_cache_dir="none"))


def test_an_install_without_the_releases_engine_says_which_image_serves_it(
    tiny_openvino_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in the torch image: no openvino_genai to import.
    monkeypatch.delitem(sys.modules, "sd_lambda.engine.openvino_engine")
    monkeypatch.setitem(sys.modules, "openvino_genai", None)
    with pytest.raises(
        LayoutError, match=r"openvino engine is not installed .*make build-image ENGINE=openvino"
    ):
        backend.load_engine(tiny_openvino_model_dir, Settings())
    assert backend.import_expected_engine(Settings(engine="openvino")) is None


def test_a_latent_under_16_elements_matches_torch_too(
    ov_engine: OpenVINOEngine, torch_engine: Engine
) -> None:
    # 16x8 px: a 4x2x1 latent, which torch draws element by element (torch_noise's scalar path).
    request = params(width=16, height=8, scheduler="euler", decoder="full")
    ours, theirs = (
        pixels(ov_engine.generate(request).images[0]),
        pixels(torch_engine.generate(request).images[0]),
    )
    assert ours.shape == theirs.shape == (8, 16, 3)
    assert np.abs(ours - theirs).mean() <= PARITY_MAX_MEAN_ABS


def with_scheduler_config(source: Path, folder: Path, **changes: object) -> Path:
    copy = shutil.copytree(source, folder)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return copy


@pytest.mark.parametrize("own", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_auto_serves_euler_when_genai_cannot_run_the_models_own_scheduler(
    tiny_openvino_model_dir: Path, tmp_path: Path, own: str
) -> None:
    # DDIM without clip_sample in its config clips (diffusers' default), which GenAI refuses mid-request.
    model = with_scheduler_config(tiny_openvino_model_dir, tmp_path / "model", _class_name=own)
    engine = OpenVINOEngine.load(model, Settings(openvino_cache_dir="none"))
    assert engine.default_scheduler == "euler"
    assert f"the model's own {own} does not run on OpenVINO GenAI" in engine.scheduler_reason
    assert engine.defaults.num_inference_steps == 20
    assert engine.generate(params(num_inference_steps=2)).stats["scheduler"] == "EulerDiscreteScheduler"
    with pytest.raises(ValueError, match=f"the model's own {own} does not run on OpenVINO GenAI"):
        OpenVINOEngine.load(model, Settings(default_scheduler="model", openvino_cache_dir="none"))


def test_a_damaged_decoder_fails_the_load_not_a_later_request(
    tiny_openvino_model_dir: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(tiny_openvino_model_dir, tmp_path / "copy")
    weights = copy / "vae_decoder" / "openvino_model.bin"  # not the default decoder (tiny)
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(LayoutError, match="cannot load the OpenVINO release"):
        OpenVINOEngine.load(copy, Settings(openvino_cache_dir="none"))


def test_a_release_pruned_after_the_load_fails_a_new_shape_as_a_layout_error(
    tiny_openvino_model_dir: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(tiny_openvino_model_dir, tmp_path / "copy")
    engine = OpenVINOEngine.load(copy, Settings(openvino_cache_dir="none"))
    shutil.rmtree(copy)
    assert engine.generate(params(num_inference_steps=1)).images[0].size == (64, 64)  # compiled at load
    with pytest.raises(LayoutError, match="cannot compile 96x64"):
        engine.generate(params(width=96, num_inference_steps=1))


def test_the_inits_engine_import_survives_a_broken_current_link(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "current").symlink_to("current")  # a loop: resolving it raises RuntimeError
    assert backend.import_expected_engine(Settings(model_root=tmp_path, model_name="m")) is None


def test_several_images_run_one_after_another_each_equal_to_its_own_seed(ov_engine: OpenVINOEngine) -> None:
    batch = ov_engine.generate(params(num_images=3))
    assert (len(batch.images), batch.stats["images"]) == (3, 3)
    assert batch.stats["unet_calls"] == 3 * ov_engine.generate(params()).stats["unet_calls"]
    for index, image in enumerate(batch.images):
        np.testing.assert_array_equal(
            pixels(image), pixels(ov_engine.generate(params(seed=42 + index)).images[0])
        )
    assert psnr(pixels(batch.images[0]), pixels(batch.images[1])) < 60


def test_offers_neither_image_to_image_nor_adapters(ov_engine: OpenVINOEngine) -> None:
    assert (ov_engine.features, ov_engine.adapters) == (frozenset(), ())
    assert ov_engine.describe()["features"] == []
