"""Each engine option changes what it should (tiny model; never timing)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sd_lambda.devtools.testing.models import build_test_model
from sd_lambda.engine import cpu
from sd_lambda.engine.accel import heap
from sd_lambda.engine.cpu import choose_threads
from sd_lambda.engine.model_defaults import DEFAULTS_MARKER
from sd_lambda.engine.torch_engine import Engine, GenerationParams, choose_dtype
from sd_lambda.settings import Settings

FP32 = Settings(dtype="float32")


def params(**overrides: Any) -> GenerationParams:
    values: dict[str, Any] = dict(
        prompt="a red fox", num_inference_steps=3, guidance_scale=7.5, width=64, height=64, seed=7
    )
    return GenerationParams(**{**values, **overrides})


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir, FP32)


class Spy:
    """Counts calls of a bound method it replaces on one instance, and keeps what the calls returned."""

    def __init__(self, target: Any, name: str) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.outputs: list[Any] = []
        self._target, self._name, self._original = target, name, getattr(target, name)
        setattr(target, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        output = self._original(*args, **kwargs)
        self.outputs.append(output)
        return output

    def restore(self) -> None:
        setattr(self._target, self._name, self._original)


@pytest.fixture
def spies(engine: Engine) -> Iterator[dict[str, Spy]]:
    made = {
        "tiny": Spy(engine.tiny_decoder, "decode"),
        "full": Spy(engine.pipeline.vae, "decode"),
        "text": Spy(engine.pipeline.text_encoder, "forward"),
    }
    yield made
    for spy in made.values():
        spy.restore()


@pytest.fixture
def unet_batches(engine: Engine) -> Iterator[list[int]]:
    batches: list[int] = []
    handle = engine.pipeline.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    yield batches
    handle.remove()


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_tiny_decoder_is_the_default_and_full_is_selectable(engine: Engine, spies: dict[str, Spy]) -> None:
    assert engine.decoders == ("full", "tiny")
    result = engine.generate(params())
    assert (len(spies["tiny"].calls), len(spies["full"].calls)) == (1, 0)
    assert result.stats["decoder"] == "tiny"
    result = engine.generate(params(decoder="full"))
    assert (len(spies["tiny"].calls), len(spies["full"].calls)) == (1, 1)
    assert result.stats["decoder"] == "full"
    assert result.images[0].size == (64, 64)


def test_default_decoder_setting_and_missing_tiny_decoder(tiny_model_dir: Path, tmp_path: Path) -> None:
    full_default = Engine.load(tiny_model_dir, Settings(dtype="float32", default_decoder="full"))
    assert full_default.choices.default_decoder == "full"
    assert full_default.generate(params(num_inference_steps=1)).stats["decoder"] == "full"
    plain = build_test_model(tmp_path / "plain", "tiny", tiny_decoder=False)
    without = Engine.load(plain, FP32)
    assert without.decoders == ("full",)
    assert without.describe()["default_decoder"] == "full"
    with pytest.raises(ValueError, match="decoder 'tiny' is not available"):
        without.generate(params(decoder="tiny"))
    with pytest.raises(ValueError, match="no vae_tiny/ folder"):
        Engine.load(plain, Settings(dtype="float32", default_decoder="tiny"))


def test_bf16_yields_a_finite_image_of_the_requested_size(tiny_model_dir: Path) -> None:
    bf16 = Engine.load(tiny_model_dir, Settings(dtype="bfloat16"))
    assert bf16.pipeline.unet.dtype == torch.bfloat16
    assert bf16.tiny_decoder.dtype == torch.bfloat16
    decode = Spy(bf16, "_decode")
    result = bf16.generate(params(width=96, height=64, decoder="full"))
    pixels = decode.outputs[0]
    assert pixels.dtype == torch.bfloat16
    assert torch.isfinite(pixels.float()).all()
    assert result.images[0].size == (96, 64)
    assert result.stats["dtype"] == "bfloat16"
    assert np.asarray(result.images[0]).std() > 0  # not a blank frame


def test_scheduler_switch_takes_effect_and_instances_are_reused(engine: Engine) -> None:
    # auto: the tiny model ships SD's PNDM, which the engine replaces with DPM-Solver++.
    assert engine.generate(params()).stats["scheduler"] == "DPMSolverMultistepScheduler"
    result = engine.generate(params(scheduler="euler_a"))
    assert result.stats["scheduler"] == "EulerAncestralDiscreteScheduler"
    first = engine.pipeline.scheduler
    engine.generate(params(scheduler="euler_a"))
    assert engine.pipeline.scheduler is first
    pndm = engine.generate(params(scheduler="pndm", num_inference_steps=3))
    assert pndm.stats["scheduler"] == "PNDMScheduler"
    assert pndm.stats["unet_calls"] == 4  # PNDM's warm-up call, which the default avoids
    assert engine.generate(params(num_inference_steps=3)).stats["unet_calls"] == 3


def test_model_scheduler_setting(tiny_model_dir: Path) -> None:
    own = Engine.load(tiny_model_dir, Settings(dtype="float32", default_scheduler="model"))
    assert own.generate(params(num_inference_steps=1)).stats["scheduler"] == "PNDMScheduler"
    assert own.defaults.num_inference_steps == 25
    with pytest.raises(ValueError, match="SD_DEFAULT_SCHEDULER='heun'"):
        Engine.load(tiny_model_dir, Settings(dtype="float32", default_scheduler="heun"))


def test_guidance_off_runs_a_batch_of_one(engine: Engine, unet_batches: list[int]) -> None:
    engine.generate(params(guidance_scale=7.5))
    assert set(unet_batches) == {2}
    unet_batches.clear()
    result = engine.generate(params(guidance_scale=1.0))
    assert unet_batches == [1, 1, 1]
    assert result.stats["guided"] is False
    unet_batches.clear()
    engine.generate(params(guidance_scale=0.0))
    assert set(unet_batches) == {1}


def test_empty_negative_prompt_is_encoded_once_at_load(engine: Engine, spies: dict[str, Spy]) -> None:
    engine.generate(params())
    assert len(spies["text"].calls) == 1  # the prompt; the empty negative comes from the load-time cache
    engine.generate(params(negative_prompt="blurry"))
    assert len(spies["text"].calls) == 3


def test_feature_reuse_is_opt_in_and_skips_the_deep_blocks(engine: Engine, tiny_model_dir: Path) -> None:
    reusing = Engine.load(tiny_model_dir, replace(FP32, accel="+feature_reuse"))
    mid_calls: list[int] = []
    for loaded in (engine, reusing):  # inside the reused part: runs only on full calls
        loaded.pipeline.unet.mid_block.resnets[0].register_forward_pre_hook(lambda m, a: mid_calls.append(1))
    plain = engine.generate(params(num_inference_steps=4))
    assert (len(mid_calls), plain.stats["reused_calls"]) == (4, 0)
    mid_calls.clear()
    reused = reusing.generate(params(num_inference_steps=4))
    assert (len(mid_calls), reused.stats["reused_calls"], reused.stats["unet_calls"]) == (2, 2, 4)
    plain_pixels = np.asarray(plain.images[0], dtype=np.int16)
    assert np.abs(plain_pixels - np.asarray(reused.images[0], dtype=np.int16)).max() > 0
    again = reusing.generate(params(num_inference_steps=4))  # the cache is per generation: nothing leaks
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(reused.images[0]))
    # A batch of images reuses per call for the whole batch: image i is still what seed + i gives alone.
    batch = reusing.generate(params(num_inference_steps=4, num_images=2))
    assert (batch.stats["reused_calls"], batch.stats["unet_batch"]) == (2, 4)
    np.testing.assert_allclose(pixels(batch.images[0]), pixels(reused.images[0]), atol=2)


def test_generation_is_deterministic_and_timed(engine: Engine) -> None:
    first, second = engine.generate(params()), engine.generate(params())
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert {"text_encoder", "unet", "decode", "inference"} <= set(first.timings_ms)
    assert first.stats["unet_calls"] == 3


def _rewrite_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_lcm_model_defaults_skip_guidance(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "lcm")
    _rewrite_json(model / "scheduler" / "scheduler_config.json", _class_name="LCMScheduler")
    _rewrite_json(model / "model_index.json", scheduler=["diffusers", "LCMScheduler"])
    lcm = Engine.load(model, FP32)
    assert (lcm.defaults.guidance_scale, lcm.defaults.num_inference_steps) == (1.0, 4)
    assert lcm.describe()["default_scheduler"] == "LCMScheduler"
    result = lcm.generate(params(guidance_scale=lcm.defaults.guidance_scale, num_inference_steps=2))
    assert (result.stats["unet_batch"], result.stats["scheduler"]) == (1, "LCMScheduler")


def test_turbo_source_and_marker_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "turbo")
    (model / "manifest.json").write_text(json.dumps({"source": "stabilityai/sd-turbo", "files": []}))
    turbo = Engine.load(model, FP32)
    assert (turbo.defaults.guidance_scale, turbo.defaults.num_inference_steps) == (0.0, 1)
    assert turbo.describe()["classifier_free_guidance_default"] is False
    (model / DEFAULTS_MARKER).write_text(json.dumps({"num_inference_steps": 2, "width": 96}))
    marked = Engine.load(model, FP32)
    assert (marked.defaults.num_inference_steps, marked.defaults.width, marked.defaults.guidance_scale) == (
        2,
        96,
        0.0,
    )
    (model / DEFAULTS_MARKER).write_text(json.dumps({"steps": 2}))
    with pytest.raises(ValueError, match="unknown keys \\['steps'\\]"):
        Engine.load(model, FP32)


def test_threads_setting_and_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_threads(Settings(threads=3)) == (3, "SD_THREADS")
    budget = cpu.CpuBudget(cpus=6, affinity=8, quota=6.0, source="/sys/fs/cgroup/cpu.max")
    monkeypatch.setattr(cpu, "cpu_budget", lambda: budget)
    threads, reason = choose_threads(Settings())
    assert threads == 6
    assert "cgroup quota 6 CPUs" in reason


def test_dtype_follows_the_cpu_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    native = frozenset({"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert choose_dtype(Settings(), native)[0] == torch.bfloat16
    assert choose_dtype(Settings(), frozenset({"avx2"}))[0] == torch.float32
    assert choose_dtype(Settings(dtype="float32"), native)[0] == torch.float32
    assert choose_dtype(Settings(dtype="bfloat16"), frozenset())[0] == torch.bfloat16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert choose_dtype(Settings(), native)[0] == torch.float32
    with pytest.raises(ValueError, match="SD_DTYPE='fp8'"):
        choose_dtype(Settings(dtype="fp8"), native)


def test_decoders_are_channels_last_and_the_unet_is_not(engine: Engine) -> None:
    channels_last = torch.channels_last
    assert engine.pipeline.vae.decoder.conv_in.weight.is_contiguous(memory_format=channels_last)
    assert engine.tiny_decoder.decoder.layers[0].weight.is_contiguous(memory_format=channels_last)
    assert engine.pipeline.unet.conv_in.weight.is_contiguous()


def test_vae_encoder_is_kept_by_default_for_image_to_image(engine: Engine) -> None:
    assert engine.pipeline.vae.encoder is not None
    assert "init_image" in engine.features
    assert "init_image" in engine.describe()["features"]


def test_vae_encoder_drop_frees_it_keeps_the_full_decoder_and_refuses_init_image(
    tiny_model_dir: Path,
) -> None:
    dropped = Engine.load(tiny_model_dir, replace(FP32, accel="+vae_encoder_drop"))
    vae = dropped.pipeline.vae
    assert vae.encoder is None
    assert vae.quant_conv is None
    assert not any(name.startswith(("encoder.", "quant_conv.")) for name, _ in vae.named_parameters())
    assert sum(p.numel() for p in vae.parameters()) > 0  # the decoder half is still there
    assert "in_place" in dropped.choices.accelerations
    image = dropped.generate(params(decoder="full")).images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0
    assert "init_image" not in dropped.features
    assert "vae_encoder_drop" in dropped.describe()["unavailable_features"]["init_image"]
    with pytest.raises(ValueError, match="vae_encoder_drop"):
        dropped.generate(params(init_image=image, strength=0.5))


@pytest.mark.parametrize("accel", ["default", "-heap_trim", "-in_place"])
def test_freed_memory_goes_back_before_the_decode_and_before_each_up_block(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, accel: str
) -> None:
    events: list[str] = []
    monkeypatch.setattr(heap, "return_freed_memory", lambda: events.append("returned") or True)
    engine = Engine.load(tiny_model_dir, replace(FP32, accel=accel))
    decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda *args: events.append("decode") or decode(*args))
    engine.pipeline.unet.register_forward_pre_hook(lambda module, args: events.append("unet"))
    for block in engine.pipeline.vae.decoder.up_blocks:
        block.resnets[1].register_forward_pre_hook(lambda module, args: events.append("up block"))
    engine.generate(params(decoder="full"))
    blocks = len(engine.pipeline.vae.decoder.up_blocks)
    assert blocks > 1
    # Into the decoder, then into each up block (before its first resnet), with or without in_place.
    if accel == "-heap_trim":
        assert events == ["unet"] * 3 + ["decode"] + ["up block"] * blocks
    else:
        assert events == ["unet"] * 3 + ["decode", "returned"] + ["returned", "up block"] * blocks
    events.clear()
    engine.generate(params(decoder="tiny"))
    assert events == ["unet"] * 3 + ["decode"] + (["returned"] if accel != "-heap_trim" else [])


def test_heap_keep_is_skipped_beside_heap_trim(tiny_model_dir: Path) -> None:
    both = Engine.load(tiny_model_dir, replace(FP32, accel="+heap_keep"))
    assert "heap_trim" in both.choices.accelerations
    assert "heap_trim is selected" in both.choices.skipped_accelerations["heap_keep"]


def test_describe_reports_the_choices(engine: Engine) -> None:
    described = engine.describe()
    assert described["dtype"] == "float32"
    assert described["threads"] == engine.choices.threads
    assert described["default_decoder"] == "tiny"
    assert described["default_scheduler"] == "dpmpp_2m"
    assert described["classifier_free_guidance_default"] is True
    assert described["accelerations"] == list(engine.choices.accelerations)
    assert "upsample_fold" in described["accelerations"]
    assert described["skipped_accelerations"] == engine.choices.skipped_accelerations == {}


# ---- several images, image-to-image ---------------------------------------------------------------


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_several_images_are_one_unet_batch_and_each_equals_its_own_seed(
    engine: Engine, unet_batches: list[int], guidance_scale: float
) -> None:
    batch = engine.generate(params(num_images=3, guidance_scale=guidance_scale))
    per_call = 6 if guidance_scale > 1 else 3
    assert set(unet_batches) == {per_call}
    assert (batch.stats["unet_batch"], batch.stats["images"]) == (per_call, 3)
    assert len(batch.images) == 3
    for index, image in enumerate(batch.images):
        single = engine.generate(params(seed=7 + index, guidance_scale=guidance_scale)).images[0]
        # A batched matmul may sum in another order: equal within a small tolerance, not bitwise.
        np.testing.assert_allclose(pixels(image), pixels(single), atol=2)
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).max() > 0


def test_guidance_prefix_shares_a_batch_of_images(tiny_model_dir: Path) -> None:
    shared = Engine.load(tiny_model_dir, replace(FP32, accel="+guidance_prefix"))
    stock = Engine.load(tiny_model_dir, replace(FP32, accel="none"))
    ours, theirs = shared.generate(params(num_images=2)), stock.generate(params(num_images=2))
    assert ours.stats["prefix_shared_calls"] == ours.stats["unet_calls"] > 0
    for mine, reference in zip(ours.images, theirs.images, strict=True):
        np.testing.assert_allclose(pixels(mine), pixels(reference), atol=2)


def start_image() -> Any:
    from PIL import Image

    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    return Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], axis=-1))


def test_image_to_image_uses_the_loaded_modules_without_copying_weights(engine: Engine) -> None:
    img2img = engine.img2img
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(img2img, name), getattr(engine.pipeline, name)
        assert ours is theirs
        assert [p.data_ptr() for p in ours.parameters()] == [p.data_ptr() for p in theirs.parameters()]


def test_image_to_image_moves_further_from_the_start_as_strength_grows(engine: Engine) -> None:
    def run(strength: float, prompt: str = "a red fox") -> Any:
        return engine.generate(
            params(prompt=prompt, init_image=start_image(), strength=strength, num_inference_steps=4)
        )

    untouched = run(0.0)
    assert untouched.stats["unet_calls"] == 0
    assert untouched.stats["image_to_image"] is True
    # No step ran: the start image through the VAE, whatever the prompt says.
    np.testing.assert_array_equal(pixels(run(0.0, "a blue whale").images[0]), pixels(untouched.images[0]))
    distances = []
    for strength in (0.25, 0.5, 1.0):
        result = run(strength)
        assert result.stats["unet_calls"] == int(4 * strength)
        distances.append(np.abs(pixels(result.images[0]) - pixels(untouched.images[0])).mean())
    assert 0 < distances[0] < distances[1] < distances[2]


def test_image_to_image_gives_several_images_each_equal_to_its_own_seed(engine: Engine) -> None:
    batch = engine.generate(
        params(init_image=start_image(), strength=0.5, num_images=2, num_inference_steps=4)
    )
    assert [image.size for image in batch.images] == [(64, 64)] * 2
    second = engine.generate(params(init_image=start_image(), strength=0.5, seed=8, num_inference_steps=4))
    np.testing.assert_allclose(pixels(batch.images[1]), pixels(second.images[0]), atol=2)


@pytest.mark.parametrize("decoder", ["tiny", "full"])
def test_image_to_image_decodes_with_either_decoder(
    engine: Engine, spies: dict[str, Spy], decoder: str
) -> None:
    result = engine.generate(params(init_image=start_image(), strength=0.5, decoder=decoder))
    assert result.stats["decoder"] == decoder
    assert len(spies[decoder].calls) == 1
