"""The VAE decoder's resnets, computed in place where their inputs are temporaries, and each
full-resolution temporary freed as soon as the next layer has consumed it.

At 512x512 the decoder's activations are 134-268 MB each in fp32, and a fresh tensor of that size
costs a page fault per 4 KiB. In a diffusers ``ResnetBlock2D`` without a time embedding, up/down
sampling or output scaling (the decoder's), each SiLU follows a GroupNorm whose output is fresh and
the residual sum ``(input + hidden) / 1.0`` can be added into ``hidden``; the decoder's ``conv_act``
follows ``conv_norm_out``. Same operations on the same values, so the output is bitwise identical,
with three full-resolution allocations fewer per resnet. Resnets with a time embedding (the UNet's)
are left alone: their SiLU also runs on the embedding shared by every block.

The decode's peak memory is set by how many of those tensors are alive at once. ``Decoder.forward``
keeps each up block's input (268 MB going into the last one) until the whole block has returned;
here the block takes it over and it is freed once the block's first resnet has read it. With conv1's
output freed once norm2 has read it (as in the stock resnet), the decoder's peak working memory at
512x512 goes from 804 to 670 MB, set by the last block's first resnet (its 268 MB input and
GroupNorm output, and conv1's 134 MB output).

Both are diffusers hooks (``diffusers.hooks.ModelHook`` with its own ``new_forward``): the modules stay
stock classes, and any call these do not cover (a gradient, a time or latent embedding) runs the stock
forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D

HOOK = "sd_lambda.in_place"


class ResnetInPlace(ModelHook):
    """A plain ``ResnetBlock2D`` (see ``plain_resnet``) computed in place when no gradient is recorded."""

    def new_forward(
        self,
        module: ResnetBlock2D,
        input_tensor: torch.Tensor,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kw: Any,
    ) -> torch.Tensor:
        if temb is not None or torch.is_grad_enabled():
            return self.fn_ref.original_forward(input_tensor, temb, *args, **kw)
        hidden = module.conv1(F.silu(module.norm1(input_tensor), inplace=True))
        # A statement of its own, so conv1's output is freed before conv2 allocates its output.
        hidden = module.dropout(F.silu(module.norm2(hidden), inplace=True))
        hidden = module.conv2(hidden)
        shortcut = input_tensor if module.conv_shortcut is None else module.conv_shortcut(input_tensor)
        return hidden.add_(shortcut)


class DecoderReleasing(ModelHook):
    """A plain ``Decoder`` whose up blocks each take over their input (see ``up_block_releasing``), with
    its output activation in place."""

    def new_forward(
        self, module: Decoder, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        if latent_embeds is not None or torch.is_grad_enabled():
            return self.fn_ref.original_forward(sample, latent_embeds)
        # The list is the only holder of the tensor between blocks, so the block that takes it out owns it.
        held = [module.mid_block(module.conv_in(sample), None)]
        for up_block in module.up_blocks:
            held.append(up_block_releasing(up_block, held))
        return module.conv_out(F.silu(module.conv_norm_out(held.pop()), inplace=True))


def _hooked(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return bool(module._forward_hooks or module._forward_pre_hooks or (registry and registry.hooks))


def up_block_releasing(block: torch.nn.Module, held: list[torch.Tensor]) -> torch.Tensor:
    """``block`` on the tensor it takes out of ``held``, which is freed once its first resnet returns.
    Anything but a hook-free ``UpDecoderBlock2D`` is called as it is (and holds its input throughout)."""
    if type(block) is not UpDecoderBlock2D or _hooked(block):
        return block(held.pop(), None)
    first, *rest = block.resnets
    hidden = first(held.pop(), temb=None)
    for resnet in rest:
        hidden = resnet(hidden, temb=None)
    for upsampler in block.upsamplers or ():
        hidden = upsampler(hidden)
    return hidden


def plain_resnet(module: torch.nn.Module) -> bool:
    return (
        type(module) is ResnetBlock2D
        and module.time_emb_proj is None
        and module.upsample is None
        and module.downsample is None
        and module.time_embedding_norm != "scale_shift"  # the others just normalise without a temb
        and module.output_scale_factor == 1.0
        and type(module.nonlinearity) is torch.nn.SiLU
    )


def plain_decoder(module: torch.nn.Module) -> bool:
    return (
        type(module) is Decoder
        and isinstance(module.conv_norm_out, torch.nn.GroupNorm)
        and type(module.conv_act) is torch.nn.SiLU
    )


def decoder_in_place(model: torch.nn.Module) -> int:
    """Register the in-place hooks on ``model``'s plain resnets and decoders; returns how many modules."""
    switched = 0
    for module in model.modules():
        if HOOK in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}):
            continue
        if plain_resnet(module):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(ResnetInPlace(), HOOK)
            switched += 1
        elif plain_decoder(module):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(DecoderReleasing(), HOOK)
            switched += 1
    return switched


class InPlace:
    """The registry's entry (sd_lambda.engine.accel.registry): the full VAE's decoder."""

    @staticmethod
    def check(target: Any) -> str | None:
        decoder = getattr(target.pipeline.vae, "decoder", None)
        if decoder is None or not any(plain_resnet(m) or plain_decoder(m) for m in decoder.modules()):
            return "the VAE decoder has no plain diffusers resnets or Decoder"
        return None

    @staticmethod
    def apply(target: Any) -> str:
        return f"{decoder_in_place(target.pipeline.vae.decoder)} VAE decoder modules"
