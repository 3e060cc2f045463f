from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D

from sd_lambda.in_place import decoder_in_place


def test_vae_decoder_runs_in_place_with_bitwise_identical_output(tiny_model_dir: Path) -> None:
    stock = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    tuned = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    resnets = sum(1 for m in tuned.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    assert resnets > 0
    assert decoder_in_place(tuned.decoder) == resnets + 1  # every decoder resnet, and conv_act
    assert decoder_in_place(tuned.decoder) == 0  # already switched
    latents = torch.randn(1, 4, 9, 8)
    kept = latents.clone()
    with torch.inference_mode():
        expected = stock.decode(latents).sample
        torch.testing.assert_close(tuned.decode(latents).sample, expected, rtol=0, atol=0)
    torch.testing.assert_close(latents, kept, rtol=0, atol=0)  # the caller's tensor is untouched
    with torch.no_grad():  # no inference mode: still the same values
        torch.testing.assert_close(tuned.decode(latents).sample, expected, rtol=0, atol=0)


@pytest.mark.parametrize("out_channels", [8, 4])  # the same, and a 1x1 shortcut conv
def test_a_resnet_leaves_its_input_untouched(out_channels: int) -> None:
    torch.manual_seed(0)
    stock = ResnetBlock2D(in_channels=8, out_channels=out_channels, temb_channels=None, groups=4).eval()
    tuned = copy.deepcopy(stock)
    assert decoder_in_place(tuned) == 1
    x = torch.randn(2, 8, 6, 5)
    kept = x.clone()
    with torch.inference_mode():
        torch.testing.assert_close(tuned(x, None), stock(x, None), rtol=0, atol=0)
    torch.testing.assert_close(x, kept, rtol=0, atol=0)


def test_with_gradients_the_stock_forward_runs(tiny_model_dir: Path) -> None:
    stock = AutoencoderKL.from_pretrained(tiny_model_dir / "vae")
    tuned = AutoencoderKL.from_pretrained(tiny_model_dir / "vae")
    decoder_in_place(tuned.decoder)
    grads = []
    for model in (stock, tuned):
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        model.decode(latents).sample.sum().backward()
        grads.append(latents.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_unet_resnets_with_a_shared_time_embedding_are_left_alone(tiny_model_dir: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    assert decoder_in_place(unet) == 0
    assert not any("forward" in vars(m) for m in unet.modules())
