from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sd_lambda.engine.accel.small_conv import is_routed, output_pixels, route_small_map_convs
from sd_lambda.engine.torch_engine import Engine
from sd_lambda.settings import Settings


def conv(*args: Any, seed: int = 0, **kwargs: Any) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(*args, **kwargs).eval()


@pytest.fixture
def im2col_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The input shapes of the convolutions run with oneDNN switched off, which is when ATen takes its
    im2col kernel (they still compute)."""
    calls: list[tuple[int, ...]] = []
    real = torch.nn.functional.conv2d

    def spy(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.backends.mkldnn.enabled:
            calls.append(tuple(input.shape))
        return real(input, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    return calls


def test_with_onednn_off_aten_takes_the_im2col_kernel_bitwise() -> None:
    layer = conv(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 8, 8)
    routed = conv(8, 8, 3, padding=1)
    route_small_map_convs(routed)
    with torch.inference_mode(), torch.profiler.profile() as profile:
        actual = routed(x)
    kernels = {event.name for event in profile.events()}
    assert "aten::_slow_conv2d_forward" in kernels
    assert "aten::mkldnn_convolution" not in kernels
    with torch.inference_mode():
        expected = torch._C._nn.thnn_conv2d(x, layer.weight, (3, 3), layer.bias, (1, 1), (1, 1))
    assert torch.equal(actual, expected)
    assert torch.backends.mkldnn.enabled  # switched back on


def test_output_pixels_follow_the_convolution_arithmetic() -> None:
    assert output_pixels(16, 16, conv(4, 4, 3, padding=1)) == 256
    assert output_pixels(17, 16, conv(4, 4, 3, padding=1)) == 272
    assert output_pixels(32, 32, conv(4, 4, 3, stride=2, padding=1)) == 256
    assert output_pixels(9, 9, conv(4, 4, 2)) == 64
    assert output_pixels(8, 10, conv(4, 4, (3, 1), padding=(1, 0))) == 80


# Batches of two or more: stock PyTorch itself sends small fp32 batch-1 inputs to the im2col kernel, so
# only these compare it against oneDNN.
@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((2, 6, 8, 8), {"kernel_size": 3, "padding": 1}),
        ((3, 6, 16, 16), {"kernel_size": 3, "padding": 1, "bias": False}),
        ((2, 6, 32, 32), {"kernel_size": 3, "stride": 2, "padding": 1}),
        ((2, 6, 9, 7), {"kernel_size": 2}),
        ((2, 6, 9, 7), {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0)}),
    ],
)
def test_a_routed_conv_computes_what_the_stock_one_does_in_the_im2col_kernel_image_by_image(
    shape: tuple[int, ...], kwargs: dict[str, Any], im2col_calls: list[tuple[int, ...]]
) -> None:
    stock = conv(6, 5, **kwargs)
    routed = conv(6, 5, **kwargs)
    route_small_map_convs(routed)
    x = torch.randn(shape)
    with torch.inference_mode():
        expected, actual = stock(x), routed(x)
    # One call per image, so MKL's sgemm gets every thread (thnn_conv2d gives a batch one per image).
    assert im2col_calls == [(1, *shape[1:])] * shape[0]
    assert actual.shape == expected.shape
    assert actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_only_small_contiguous_fp32_maps_leave_onednn(im2col_calls: list[tuple[int, ...]]) -> None:
    layer = conv(4, 4, 3, padding=1)
    route_small_map_convs(layer)
    with torch.inference_mode():
        layer(torch.randn(1, 4, 16, 16))  # 256 output pixels: im2col
        layer(torch.randn(1, 4, 17, 16))  # 272: the stock path
        layer(torch.randn(1, 4, 8, 8).to(memory_format=torch.channels_last))  # oneDNN's own layout
        layer(torch.randn(4, 8, 8))  # unbatched
        assert layer(torch.randn(0, 4, 8, 8)).shape == (0, 4, 8, 8)  # an empty batch
        layer(torch.randn(1, 4, 8, 16)[..., ::2])  # a strided view
        layer.to(torch.bfloat16)(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))  # measured in fp32 only
    assert im2col_calls == [(1, 4, 16, 16)]


class _CustomConv(torch.nn.Conv2d):
    pass


def test_only_dense_convs_larger_than_1x1_are_routed() -> None:
    model = torch.nn.ModuleDict(
        {
            "three": conv(4, 4, 3, padding=1),
            "strided": conv(4, 4, 3, stride=2, padding=1),
            "one": conv(4, 4, 1),
            "grouped": conv(4, 4, 3, padding=1, groups=2),
            "dilated": conv(4, 4, 3, padding=2, dilation=2),
            "same": conv(4, 4, 3, padding="same"),
            "reflect": conv(4, 4, 3, padding=1, padding_mode="reflect"),
            "subclass": _CustomConv(4, 4, 3, padding=1),
        }
    )
    assert route_small_map_convs(model) == 2
    routed = {name for name, module in model.items() if is_routed(module)}
    assert routed == {"three", "strided"}
    assert type(model["three"]) is torch.nn.Conv2d  # a hook, not another class
    assert route_small_map_convs(model) == 0  # already routed


@pytest.mark.parametrize(
    ("dtype", "setting", "routed"),
    [
        ("float32", "+small_map_convs", True),
        ("float32", "-small_map_convs", False),
        ("bfloat16", "all", False),
    ],
)
def test_the_engine_routes_the_unets_fp32_convs_when_selected(
    tiny_model_dir: Path, dtype: str, setting: str, routed: bool
) -> None:
    engine = Engine.load(tiny_model_dir, Settings(dtype=dtype, accel=setting))
    unet_convs = [m for m in engine.pipeline.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    small = [m for m in unet_convs if is_routed(m)]
    assert ("small_map_convs" in engine.choices.accelerations) is routed
    assert bool(small) is routed
    if dtype == "bfloat16":
        assert "fp32" in engine.choices.skipped_accelerations["small_map_convs"]
    if routed:  # every 3x3 one; the 1x1 ones stay stock
        assert {m.kernel_size for m in small} == {(3, 3)}
        assert all(m.kernel_size == (1, 1) for m in unet_convs if not is_routed(m))


def test_a_routed_unet_computes_what_the_stock_one_does(tiny_model_dir: Path) -> None:
    routed = Engine.load(tiny_model_dir, Settings(dtype="float32", accel="all")).pipeline.unet
    stock = Engine.load(tiny_model_dir, Settings(dtype="float32", accel="-small_map_convs")).pipeline.unet
    torch.manual_seed(2)
    latents = torch.randn(2, routed.config.in_channels, 8, 8)
    embeds = torch.randn(2, 77, routed.config.cross_attention_dim)
    with torch.inference_mode():
        expected = stock(latents, 500, encoder_hidden_states=embeds).sample
        actual = routed(latents, 500, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
