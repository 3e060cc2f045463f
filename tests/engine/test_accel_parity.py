"""Every acceleration meant to compute the same image, all on, against stock diffusers (SD_ACCEL=none):
same model, prompt, seed and steps, in fp32, guided and unguided, through both decoders. The bound is on
the decoded tensor before it is rounded to 8 bits, so an acceleration that changes what is computed (not
just the order of a sum) fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd_lambda.engine.accel import registry
from sd_lambda.engine.torch_engine import Engine, GenerationParams
from sd_lambda.settings import Settings

# fp32 summation-order differences (folded upsamplers, im2col convolutions, channels_last kernels) stay
# orders of magnitude below this on pixels in [-1, 1]; a changed computation does not.
MAX_PIXEL_DIFFERENCE = 1e-4


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path) -> dict[str, Engine]:
    every = ",".join(registry.SAME_IMAGE)
    return {
        "accelerated": Engine.load(tiny_model_dir, Settings(dtype="float32", accel=every)),
        "stock": Engine.load(tiny_model_dir, Settings(dtype="float32", accel="none")),
    }


def decoded(engine: Engine, params: GenerationParams) -> torch.Tensor:
    """The decoder's output for ``params`` (what the images are rounded from), one image per row."""
    outputs: list[torch.Tensor] = []
    decode = engine._decode
    engine._decode = lambda *args: outputs.append(decode(*args)) or outputs[-1]  # type: ignore[method-assign]
    try:
        engine.generate(params)
    finally:
        del engine._decode
    return torch.cat(outputs).float()


def test_the_accelerated_engine_applies_every_same_image_acceleration(engines: dict[str, Engine]) -> None:
    applied = engines["accelerated"].choices.accelerations
    skipped = engines["accelerated"].choices.skipped_accelerations
    # In fp32 the bf16 copy has nothing to do, and heap_keep gives way to heap_trim; everything else runs.
    assert set(skipped) == {"bf16_copy", "heap_keep"}
    assert set(applied) == set(registry.SAME_IMAGE) - set(skipped)
    assert engines["stock"].choices.accelerations == {}


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("decoder", ["full", "tiny"])
def test_every_same_image_acceleration_computes_what_stock_diffusers_does(
    engines: dict[str, Engine], guidance_scale: float, decoder: str
) -> None:
    params = GenerationParams(
        prompt="a lighthouse at dusk",
        num_inference_steps=3,
        guidance_scale=guidance_scale,
        width=72,  # an odd latent side (9): the UNet's upsamplers take explicit output sizes
        height=64,
        seed=11,
        decoder=decoder,
    )
    accelerated, stock = decoded(engines["accelerated"], params), decoded(engines["stock"], params)
    assert accelerated.shape == stock.shape == (1, 3, 64, 72)
    assert stock.abs().max() > 0.01  # a real image, not a blank one that anything would match
    assert (accelerated - stock).abs().max().item() <= MAX_PIXEL_DIFFERENCE


def test_every_same_image_acceleration_computes_what_stock_diffusers_does_for_a_batch(
    engines: dict[str, Engine],
) -> None:
    # Several images per prompt: one UNet batch of [images, images] when guided (guidance_prefix shares
    # its halves; small_map_convs splits it per image).
    params = GenerationParams(
        prompt="a lighthouse at dusk",
        num_inference_steps=3,
        guidance_scale=7.5,
        width=72,
        height=64,
        seed=11,
        num_images=3,
    )
    accelerated, stock = decoded(engines["accelerated"], params), decoded(engines["stock"], params)
    assert accelerated.shape == stock.shape == (3, 3, 64, 72)
    assert (stock[0] - stock[1]).abs().max() > 0.01  # three images, not one three times
    assert (accelerated - stock).abs().max().item() <= MAX_PIXEL_DIFFERENCE


def test_the_bound_catches_an_acceleration_that_changes_the_image(engines: dict[str, Engine]) -> None:
    """The image-changing one (feature reuse, opt-in) is far outside the bound: the test can fail."""
    reusing = Engine.load(engines["stock"].model_dir, Settings(dtype="float32", accel="feature_reuse"))
    params = GenerationParams(
        prompt="a lighthouse at dusk", num_inference_steps=4, guidance_scale=7.5, width=64, height=64, seed=11
    )
    difference = (decoded(reusing, params) - decoded(engines["stock"], params)).abs().max().item()
    assert difference > 100 * MAX_PIXEL_DIFFERENCE
