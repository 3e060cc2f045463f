from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sd_lambda.inplace_activations import silu_in_place


def test_vae_decoder_silus_run_in_place_with_identical_output(tiny_model_dir: Path) -> None:
    stock = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    tuned = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    resnets = sum(1 for m in tuned.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    assert silu_in_place(tuned.decoder) == resnets + 1  # every decoder resnet, and conv_act
    assert silu_in_place(tuned.decoder) == 0  # already switched
    latents = torch.randn(1, 4, 9, 8)
    kept = latents.clone()
    with torch.inference_mode():
        torch.testing.assert_close(tuned.decode(latents).sample, stock.decode(latents).sample, rtol=0, atol=0)
    torch.testing.assert_close(latents, kept, rtol=0, atol=0)  # the caller's tensor is untouched


def test_unet_resnets_with_a_shared_time_embedding_are_left_alone(tiny_model_dir: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    assert silu_in_place(unet) == 0
    assert not any(isinstance(m, torch.nn.SiLU) and m.inplace for m in unet.modules())
