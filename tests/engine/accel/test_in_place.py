from __future__ import annotations

import copy
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.resnet import ResnetBlock2D

from sd_lambda.engine.accel.in_place import HOOK, decoder_in_place


def test_vae_decoder_runs_in_place_with_bitwise_identical_output(tiny_model_dir: Path) -> None:
    stock = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    tuned = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    resnets = sum(1 for m in tuned.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    assert resnets > 0
    assert decoder_in_place(tuned.decoder) == resnets + 1  # every decoder resnet, and the decoder
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


def _freed_by_then(tracked: torch.nn.Module, checked: torch.nn.Module, what: str) -> list[bool]:
    """Whether ``tracked``'s input (``what="input"``) or output is gone each time ``checked`` starts."""
    refs: list[weakref.ref[torch.Tensor]] = []
    freed: list[bool] = []
    if what == "input":
        tracked.register_forward_pre_hook(lambda _m, args: refs.append(weakref.ref(args[0])))
    else:
        tracked.register_forward_hook(lambda _m, _args, out: refs.append(weakref.ref(out)))
    checked.register_forward_pre_hook(lambda _m, _args: freed.append(refs[-1]() is None))
    return freed


def test_a_resnet_frees_conv1s_output_before_conv2_runs() -> None:
    resnet = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4).eval()
    freed = _freed_by_then(resnet.conv1, resnet.conv2, "output")
    x = torch.randn(1, 8, 6, 6)
    assert decoder_in_place(resnet) == 1
    with torch.inference_mode():
        resnet(x, None)
    assert freed == [True]  # as in the stock forward, which reassigns one variable step by step


def test_an_up_blocks_input_is_freed_once_its_first_resnet_returns(tiny_model_dir: Path) -> None:
    vae = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    blocks = vae.decoder.up_blocks
    assert all(len(block.resnets) > 1 for block in blocks)
    freed = [_freed_by_then(block.resnets[0], block.resnets[1], "input") for block in blocks]
    latents = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        vae.decode(latents)
        assert all(seen == [False] for seen in freed)  # stock: Decoder.forward holds it
        decoder_in_place(vae.decoder)
        vae.decode(latents)
    assert all(seen == [False, True] for seen in freed)


def test_an_up_block_with_hooks_is_called_as_a_module(tiny_model_dir: Path) -> None:
    stock = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    tuned = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    decoder_in_place(tuned.decoder)
    outputs: list[torch.Tensor] = []
    tuned.decoder.up_blocks[0].register_forward_hook(lambda _m, _args, out: outputs.append(out))
    latents = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(tuned.decode(latents).sample, stock.decode(latents).sample, rtol=0, atol=0)
    assert len(outputs) == 1


def test_the_modules_stay_stock_diffusers_classes_with_a_named_hook(tiny_model_dir: Path) -> None:
    vae = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    decoder_in_place(vae.decoder)
    switched = [m for m in vae.decoder.modules() if hasattr(m, "_diffusers_hook")]
    assert switched
    assert all(m._diffusers_hook.get_hook(HOOK) is not None for m in switched)
    assert {type(m) for m in switched} == {Decoder, ResnetBlock2D}
    assert not any(m.__class__.__module__.startswith("sd_lambda") for m in vae.modules())
