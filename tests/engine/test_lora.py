"""The torch engine's LoRA adapters: loaded when first named, kept, exactly the requested ones active, the
accelerations' module replacements made right for them, and a broken adapter a LayoutError (a 503)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release
from peft.tuners.lora import LoraLayer

from sd_lambda.devtools.testing.models import build_test_lora
from sd_lambda.engine.accel.upsample_fold import FoldedUpsample2D
from sd_lambda.engine.generation import GenerationParams, LoraChoice
from sd_lambda.engine.torch_engine import Engine
from sd_lambda.layout import LayoutError, ModelPaths, install_release
from sd_lambda.settings import Settings


def params(*loras: LoraChoice, **overrides: Any) -> GenerationParams:
    values: dict[str, Any] = dict(
        prompt="a red fox", num_inference_steps=3, guidance_scale=7.5, width=64, height=64, seed=7
    )
    return GenerationParams(**{**values, **overrides, "loras": loras})


def pixels(engine: Engine, *loras: LoraChoice) -> np.ndarray:
    return np.asarray(engine.generate(params(*loras)).images[0]).astype(int)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelPaths:
    """The tiny model with two adapters: ``style`` (attention only) and ``locon`` (its upsamplers too)."""
    root = tmp_path_factory.mktemp("models")
    paths = seed_release(root, TEST_MODEL_NAME, TEST_REVISION, tiny_model_dir)
    built = tmp_path_factory.mktemp("loras")
    install_release(paths.adapter("style"), "a1", build_test_lora(built / "style", tiny_model_dir).parent)
    locon = build_test_lora(built / "locon", tiny_model_dir, seed=1, upsamplers=True).parent
    install_release(paths.adapter("locon"), "a1", locon)
    prompt = build_test_lora(built / "prompt", tiny_model_dir, seed=4, text_encoder=True).parent
    install_release(paths.adapter("prompt"), "a1", prompt)
    return paths


def load(model: ModelPaths, accel: str = "default") -> Engine:
    settings = Settings(
        model_root=model.model_dir.parent, model_name=model.model_dir.name, dtype="float32", accel=accel
    )
    return Engine.load(model.resolve_current(), settings)


@pytest.fixture(scope="module")
def engine(model: ModelPaths) -> Engine:
    return load(model)


def test_the_engine_offers_loras_and_lists_the_seeded_adapters(engine: Engine) -> None:
    assert "loras" in engine.features
    assert engine.adapters == ("locon", "prompt", "style")
    assert engine.describe()["loras"]["available"] == ["locon", "prompt", "style"]


def test_an_adapter_changes_the_image_and_is_off_for_the_next_request(engine: Engine) -> None:
    plain = pixels(engine)
    styled = pixels(engine, LoraChoice("style", 1.0))
    assert np.abs(styled - plain).max() > 0
    assert np.array_equal(pixels(engine), plain)  # disable_lora: nothing of it is left
    assert np.array_equal(pixels(engine, LoraChoice("style", 1.0)), styled)  # kept, not loaded again
    assert list(engine.describe()["loras"]["loaded"]) == ["style"]
    assert np.abs(pixels(engine, LoraChoice("style", 0.0)) - plain).max() <= 1


def test_two_adapters_apply_together_with_their_scales(engine: Engine) -> None:
    one = pixels(engine, LoraChoice("style", 1.0))
    both = pixels(engine, LoraChoice("style", 1.0), LoraChoice("locon", 0.7))
    assert np.abs(both - one).max() > 0
    assert np.array_equal(pixels(engine, LoraChoice("style", 1.0)), one)  # locon off again


def load_bf16(model: ModelPaths) -> Engine:
    settings = Settings(model_root=model.model_dir.parent, model_name=model.model_dir.name, dtype="bfloat16")
    return Engine.load(model.resolve_current(), settings)


def folded_upsamplers(engine: Engine) -> int:
    return sum(isinstance(m, FoldedUpsample2D) for m in engine.pipeline.unet.modules())


def test_upsample_fold_steps_aside_for_an_adapter_on_the_upsamplers(model: ModelPaths) -> None:
    """upsample_fold replaces the UNet's Upsample2D: an adapter trained on their convolutions would load
    without them, silently. Requests with it run stock upsamplers carrying its layers (stock diffusers'
    image); every other request runs the folded ones again."""
    folded = load(model)
    assert "upsample_fold" in folded.choices.accelerations
    count = folded_upsamplers(folded)
    assert count > 0
    seen: list[Any] = []
    hook = folded.pipeline.unet.register_forward_pre_hook(
        lambda unet, args: seen.append(unet.up_blocks[0].upsamplers[0])
    )
    locon = pixels(folded, LoraChoice("locon", 1.0))
    assert isinstance(seen[-1].conv, LoraLayer)  # the stock form, with the adapter's layer in it
    assert "locon" in folded.describe()["loras"]["stepped_aside"]["upsample_fold"]
    pixels(folded)
    hook.remove()
    assert isinstance(seen[-1], FoldedUpsample2D)
    assert folded_upsamplers(folded) == count
    stock = load(model, accel="none")
    assert np.abs(pixels(stock, LoraChoice("locon", 1.0)) - locon).max() <= 1


def test_a_request_after_an_upsampler_adapter_equals_a_fresh_environment_in_bf16(model: ModelPaths) -> None:
    """In bf16 the folded and the stock upsamplers round differently: the folded ones must be back."""
    warm = load_bf16(model)
    pixels(warm, LoraChoice("locon", 1.0), LoraChoice("style", 0.5))
    assert np.array_equal(pixels(warm), pixels(load_bf16(model)))


def test_an_adapter_seeded_after_the_load_is_found_without_a_reload(
    model: ModelPaths, tiny_model_dir: Path, tmp_path: Path
) -> None:
    engine = load(model)
    late = build_test_lora(tmp_path / "late", tiny_model_dir, seed=2).parent
    install_release(model.adapter("late"), "a1", late)
    try:
        assert "late" in engine.adapters
        assert np.abs(pixels(engine, LoraChoice("late", 1.0)) - pixels(engine)).max() > 0
    finally:
        shutil.rmtree(model.adapter("late").model_dir)


def test_an_adapter_named_with_a_dot_loads(model: ModelPaths, tiny_model_dir: Path, tmp_path: Path) -> None:
    """PEFT refuses dots in adapter names (its ModuleDict keys); layout names may hold them."""
    engine = load(model)
    install_release(
        model.adapter("sd1.5-style"), "a1", build_test_lora(tmp_path / "dot", tiny_model_dir).parent
    )
    try:
        styled = pixels(engine, LoraChoice("sd1.5-style", 1.0))
        assert np.abs(styled - pixels(engine)).max() > 0
        assert np.array_equal(styled, pixels(engine, LoraChoice("style", 1.0)))  # the same weights
    finally:
        shutil.rmtree(model.adapter("sd1.5-style").model_dir)


def test_a_warm_environment_follows_an_adapters_current(
    model: ModelPaths, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A new seed or a rollback of an adapter reaches environments that loaded it before."""
    engine = load(model)
    adapter = model.adapter("moving")
    install_release(adapter, "a1", build_test_lora(tmp_path / "a1", tiny_model_dir, seed=5).parent)
    try:
        first = pixels(engine, LoraChoice("moving", 1.0))
        install_release(adapter, "a2", build_test_lora(tmp_path / "a2", tiny_model_dir, seed=6).parent)
        second = pixels(engine, LoraChoice("moving", 1.0))
        assert np.abs(second - first).max() > 0
        assert engine.describe()["loras"]["loaded"]["moving"] == "a2"
        with adapter.locked() as lock:
            from sd_lambda.layout import activate_release

            activate_release(adapter, "a1", lock)  # a rollback
        assert np.array_equal(pixels(engine, LoraChoice("moving", 1.0)), first)
    finally:
        shutil.rmtree(adapter.model_dir)


def test_a_broken_adapter_is_a_layout_error_and_leaves_nothing_active(
    model: ModelPaths, tiny_model_dir: Path, tmp_path: Path
) -> None:
    engine = load(model)
    plain = pixels(engine)
    adapter = model.adapter("broken")
    install_release(adapter, "a1", build_test_lora(tmp_path / "broken", tiny_model_dir).parent)
    weights = adapter.resolve_current() / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated after the seed's verification
    try:
        with pytest.raises(LayoutError, match="broken"):
            engine.generate(params(LoraChoice("broken", 1.0)))
        assert np.array_equal(pixels(engine), plain)
        assert np.abs(pixels(engine, LoraChoice("style", 1.0)) - plain).max() > 0
    finally:
        shutil.rmtree(adapter.model_dir)


def test_an_adapter_on_the_text_encoder_also_changes_the_negative_prompt(engine: Engine) -> None:
    """The empty negative prompt's embedding is computed once at load, without adapters: with one on the
    text encoder active it is computed again, through the adapter, as diffusers would."""
    plain = pixels(engine)
    assert engine.loras.loaded.get("prompt") is None or not engine.loras.text_encoder_active
    calls: list[str] = []
    encode = engine._encode
    engine._encode = lambda text: calls.append(text) or encode(text)  # type: ignore[method-assign]
    try:
        prompted = pixels(engine, LoraChoice("prompt", 1.0))
        assert calls == ["a red fox", ""]
        assert engine.loras.loaded["prompt"].text_encoder
        assert any(isinstance(m, LoraLayer) for m in engine.pipeline.text_encoder.modules())
        calls.clear()
        assert np.array_equal(pixels(engine), plain)
        assert calls == ["a red fox"]  # the stored empty embedding again
    finally:
        del engine._encode
    assert np.abs(prompted - plain).max() > 0
