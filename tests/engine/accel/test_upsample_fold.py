from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.upsampling import Upsample2D

from sd_lambda.engine.accel.upsample_fold import FoldedUpsample2D, fold_kernel, fold_upsamplers
from sd_lambda.engine.generation import GenerationParams
from sd_lambda.engine.torch_engine import Engine
from sd_lambda.settings import Settings


def upsample(channels: int = 6, out_channels: int = 5, bias: bool = True, seed: int = 0) -> Upsample2D:
    torch.manual_seed(seed)
    return Upsample2D(channels, use_conv=True, out_channels=out_channels, bias=bias).eval()


def test_fold_matches_a_hand_computed_phase() -> None:
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    folded = fold_kernel(weight)
    assert folded.shape == (12, 2, 2, 2)  # output channel (2 * row phase + col phase) * 3 + o
    # Phase (row 1, col 0), output channel 0: rows (w0 + w1, w2), columns (w0, w1 + w2).
    w = weight[0]
    expected = torch.stack(
        [
            torch.stack([w[:, 0, 0] + w[:, 1, 0], w[:, 0, 1] + w[:, 0, 2] + w[:, 1, 1] + w[:, 1, 2]], -1),
            torch.stack([w[:, 2, 0], w[:, 2, 1] + w[:, 2, 2]], -1),
        ],
        -2,
    )
    torch.testing.assert_close(folded[2 * 3 + 0], expected)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 6, 1, 1), (1, 6, 8, 8)])
def test_folded_matches_upsample_then_conv(channels_last: bool, bias: bool, shape: tuple[int, ...]) -> None:
    original = upsample(bias=bias)
    folded = FoldedUpsample2D(original)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected, actual = original(x), folded(x)
    assert actual.shape == expected.shape == (shape[0], 5, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert actual.stride() == expected.stride()  # the layout the next layer was tuned for


def test_the_phases_are_computed_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each convolution makes one phase (out_channels), and the one before it is gone by then, so at most
    a quarter of the phases is alive."""
    folded = FoldedUpsample2D(upsample(channels=6, out_channels=5))
    conv2d = torch.nn.functional.conv2d
    made: list[weakref.ref[torch.Tensor]] = []
    shapes: list[tuple[int, ...]] = []
    earlier_alive: list[bool] = []

    def recording_conv2d(*args: object, **kwargs: object) -> torch.Tensor:
        earlier_alive.append(any(ref() is not None for ref in made))
        out = conv2d(*args, **kwargs)
        made.append(weakref.ref(out))
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording_conv2d)
    with torch.inference_mode():
        folded(torch.randn(2, 6, 4, 3))
    assert shapes == [(2, 5, 5, 4)] * 4
    assert earlier_alive == [False] * 4


@pytest.mark.parametrize("output_size", [(17, 15), (18, 16)])
def test_explicit_output_sizes_match_including_odd_ones(output_size: tuple[int, int]) -> None:
    original = upsample()
    folded = FoldedUpsample2D(original)
    x = torch.randn(1, 6, 9, 8)
    with torch.inference_mode():
        torch.testing.assert_close(
            folded(x, output_size), original(x, output_size=output_size), rtol=1e-5, atol=1e-5
        )


def test_odd_sizes_in_bf16_match_the_stock_module_cast_to_bf16() -> None:
    original = upsample()
    folded = FoldedUpsample2D(original)
    stock = original.to(torch.bfloat16)
    folded.to(torch.bfloat16)
    x = torch.randn(1, 6, 9, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x, (17, 15)), stock(x, output_size=(17, 15)), rtol=0, atol=0)
        assert folded(x, 16).shape == (1, 5, 16, 16)  # an int size means both sides, as in F.interpolate


def test_a_conv_named_conv2d_0_folds_too() -> None:
    torch.manual_seed(0)
    original = Upsample2D(6, use_conv=True, name="Conv2d_0").eval()
    x = torch.randn(1, 6, 5, 5)
    with torch.inference_mode():
        torch.testing.assert_close(FoldedUpsample2D(original)(x), original(x), rtol=1e-5, atol=1e-5)


class _CustomUpsample(Upsample2D):
    pass


def test_only_nearest_upsample_with_a_3x3_conv_is_replaced() -> None:
    model = torch.nn.ModuleDict(
        {
            "conv": upsample(),
            "blocks": torch.nn.ModuleList([upsample(), Upsample2D(4, use_conv=False)]),
            "transpose": Upsample2D(4, use_conv_transpose=True),
            "no_interpolate": Upsample2D(4, use_conv=True, interpolate=False),
            "five": Upsample2D(4, use_conv=True, kernel_size=5, padding=2),
            "normed": Upsample2D(4, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True),
            "subclass": _CustomUpsample(4, use_conv=True),
        }
    )
    assert len(fold_upsamplers(model)) == 2
    assert isinstance(model["conv"], FoldedUpsample2D)
    assert isinstance(model["blocks"][0], FoldedUpsample2D)
    assert type(model["blocks"][1]) is Upsample2D
    assert all(type(model[name]) is Upsample2D for name in ("transpose", "no_interpolate", "five", "normed"))
    assert type(model["subclass"]) is _CustomUpsample  # its forward may differ: left alone
    assert [name for name, _ in model["conv"].named_parameters()] == ["weight", "bias"]  # folded only


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir, Settings(dtype="float32"))


def test_engine_folds_the_unet_and_vae_and_computes_the_same_functions(
    engine: Engine, tiny_model_dir: Path
) -> None:
    unet, vae = engine.pipeline.unet, engine.pipeline.vae
    assert "upsample_fold" in engine.choices.accelerations
    assert not any(type(m) is Upsample2D and m.use_conv for m in [*unet.modules(), *vae.modules()])
    stock_unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    stock_vae = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    torch.manual_seed(1)
    embeds = torch.randn(2, 77, stock_unet.config.cross_attention_dim)
    with torch.inference_mode():
        for side in (8, 9):  # 9 is an odd latent: the UNet passes explicit output sizes
            latents = torch.randn(2, stock_unet.config.in_channels, side, side)
            torch.testing.assert_close(
                unet(latents, 500, encoder_hidden_states=embeds).sample,
                stock_unet(latents, 500, encoder_hidden_states=embeds).sample,
                rtol=1e-4,
                atol=1e-4,
            )
            decoded = vae.decode(latents[:1].to(memory_format=torch.channels_last)).sample
            torch.testing.assert_close(decoded, stock_vae.decode(latents[:1]).sample, rtol=1e-4, atol=1e-4)
    image = engine.generate(
        GenerationParams(prompt="fox", num_inference_steps=2, guidance_scale=7.5, width=72, height=72, seed=3)
    ).images[0]
    assert image.size == (72, 72)
