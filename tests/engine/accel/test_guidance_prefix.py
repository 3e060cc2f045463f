from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel

from sd_lambda.engine.accel.guidance_prefix import SharedGuidancePrefix, guidance_prefix
from sd_lambda.engine.generation import GenerationParams
from sd_lambda.engine.torch_engine import Engine
from sd_lambda.settings import Settings


@pytest.fixture(scope="module")
def tiny_unet(tiny_model_dir: Path) -> UNet2DConditionModel:
    """The tiny model's UNet (its first down block has attention). Copy it before installing hooks."""
    return UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()


def plain_first_unet() -> UNet2DConditionModel:
    """A UNet whose first down block has no attention (as SDXL's), so the prefix crosses a level."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    return unet.eval()


def names(unet: torch.nn.Module, modules: list[torch.nn.Module]) -> list[str]:
    by_module = {module: name for name, module in unet.named_modules()}
    return [by_module[module] for module in modules]


def call_order(unet: torch.nn.Module, run: Callable[[], Any]) -> list[str]:
    """The names of the modules ``run()`` calls, in the order they start."""
    started: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda module, args, name=name: started.append(name))
        for name, module in unet.named_modules()
        if name
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return started


def guided_inputs(
    unet: UNet2DConditionModel, seed: int = 1, images: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a guided pipeline step passes: the latents twice, stacked; two different prompts (each
    repeated per image, as diffusers' num_images_per_prompt does)."""
    torch.manual_seed(seed)
    latents = torch.randn(images, unet.config.in_channels, 8, 8, dtype=unet.dtype)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=unet.dtype)
    return torch.cat([latents, latents]), embeds.repeat_interleave(images, dim=0)


def batches_seen(layers: list[torch.nn.Module]) -> list[int]:
    """Install a spy under each layer's forward (so under the sharing); it records the input's batch."""
    seen: list[int] = []
    for layer in layers:
        forward = layer.forward

        def spy(hidden: torch.Tensor, *args: Any, inner: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            seen.append(hidden.shape[0])
            return inner(hidden, *args, **kwargs)

        layer.forward = spy
    return seen


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (
            "tiny",
            [
                "conv_in",
                "down_blocks.0.resnets.0",
                "down_blocks.0.attentions.0.proj_in",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
            ],
        ),
        (
            "plain_first",
            [
                "conv_in",
                "down_blocks.0.resnets.0",
                "down_blocks.0.downsamplers.0",
                "down_blocks.1.resnets.0",
                "down_blocks.1.attentions.0.proj_in",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
            ],
        ),
    ],
)
def test_the_prefix_is_the_layers_that_run_before_the_first_cross_attention(
    tiny_unet: UNet2DConditionModel, build: str, expected: list[str]
) -> None:
    unet = tiny_unet if build == "tiny" else plain_first_unet()
    prefix = names(unet, guidance_prefix(unet))
    assert prefix == expected
    sample, embeds = guided_inputs(unet)
    with torch.inference_mode():
        order = call_order(unet, lambda: unet(sample, 500, encoder_hidden_states=embeds))
    first_cross_attention = next(i for i, name in enumerate(order) if name.endswith(".attn2"))
    # In the order they run, and all of them before the prompt first enters.
    assert [order.index(name) for name in prefix] == sorted(order.index(name) for name in prefix)
    assert order.index(prefix[-1]) < first_cross_attention

    # Everything else that runs before it is the time embedding, a norm, or a block holding the prefix.
    def inside(name: str, layer: str) -> bool:
        return name == layer or name.startswith(layer + ".")

    rest = [name for name in order[:first_cross_attention] if not any(inside(name, p) for p in prefix)]
    holds_prefix = [name for name in rest if any(inside(p, name) for p in prefix)]
    others = [name for name in rest if name not in holds_prefix]
    assert others
    assert all(name.startswith("time_") or name.rsplit(".", 1)[-1].startswith("norm") for name in others)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_guided_call_computes_its_prefix_once_with_the_stock_result(
    tiny_unet: UNet2DConditionModel, dtype: torch.dtype
) -> None:
    stock = copy.deepcopy(tiny_unet).to(dtype)
    unet = copy.deepcopy(tiny_unet).to(dtype)
    seen = batches_seen(guidance_prefix(unet))
    prefix = SharedGuidancePrefix(unet)
    sample, embeds = guided_inputs(unet)
    with torch.inference_mode():
        expected = stock(sample, 500, encoder_hidden_states=embeds).sample
        actual = unet(sample, torch.tensor(500), encoder_hidden_states=embeds, return_dict=False)[0]
    assert seen == [1] * len(prefix.layers)
    assert prefix.shared_calls == 1
    assert actual.shape == expected.shape
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(actual, expected, **tolerance)
    # The two halves differ: each saw its own prompt from the first cross-attention on.
    assert not torch.equal(actual[0], actual[1])


def test_several_images_share_their_prefix_per_half_with_the_stock_result(
    tiny_unet: UNet2DConditionModel,
) -> None:
    stock = copy.deepcopy(tiny_unet)
    unet = copy.deepcopy(tiny_unet)
    seen = batches_seen(guidance_prefix(unet))
    prefix = SharedGuidancePrefix(unet)
    sample, embeds = guided_inputs(unet, images=3)
    with torch.inference_mode():
        expected = stock(sample, 500, encoder_hidden_states=embeds).sample
        actual = unet(sample, torch.tensor(500), encoder_hidden_states=embeds, return_dict=False)[0]
    assert seen == [3] * len(prefix.layers)  # one half: the three images once
    assert prefix.shared_calls == 1
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call",
    [
        "different latents",
        "one image",
        "a timestep per half",
        "an extra argument",
    ],
)
def test_anything_but_a_plain_call_with_equal_halves_runs_stock(
    tiny_unet: UNet2DConditionModel, call: str
) -> None:
    unet = copy.deepcopy(tiny_unet)
    seen = batches_seen(guidance_prefix(unet))
    prefix = SharedGuidancePrefix(unet)
    sample, embeds = guided_inputs(unet)
    timestep: Any = 500
    extra: dict[str, Any] = {}
    if call == "different latents":
        sample = torch.randn_like(sample)
    elif call == "one image":
        sample, embeds = sample[:1], embeds[:1]
    elif call == "a timestep per half":
        timestep = torch.tensor([500, 400])
    else:
        extra = {"encoder_attention_mask": torch.ones(2, 77)}
    with torch.inference_mode():
        unet(sample, timestep, encoder_hidden_states=embeds, **extra)
    assert seen == [sample.shape[0]] * len(prefix.layers)
    assert prefix.shared_calls == 0


def test_the_engine_shares_the_prefix_of_guided_calls_only(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, Settings(dtype="float32", accel="all"))
    # Inside the loaded engine, with every other load-time change applied: the prefix's own
    # sublayers see one image, the first cross-attention both.
    block = engine.pipeline.unet.down_blocks[0]
    transformer = block.attentions[0].transformer_blocks[0]
    seen = batches_seen([block.resnets[0].norm1, transformer.attn1.to_q, transformer.attn2.to_q])
    params = {"prompt": "a lighthouse", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 3}
    guided = engine.generate(GenerationParams(**params, guidance_scale=7.5))
    assert seen == [1, 1, 2] * 2  # resnet, self-attention, cross-attention; two calls
    unguided = engine.generate(GenerationParams(**params, guidance_scale=1.0))
    assert (guided.stats["guided"], guided.stats["prefix_shared_calls"]) == (True, 2)
    assert (unguided.stats["guided"], unguided.stats["prefix_shared_calls"]) == (False, 0)
