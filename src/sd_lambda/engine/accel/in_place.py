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
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D


def _resnet_forward_in_place(
    self: ResnetBlock2D, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args: Any, **kw: Any
) -> torch.Tensor:
    if temb is not None or torch.is_grad_enabled():
        return ResnetBlock2D.forward(self, input_tensor, temb, *args, **kw)
    hidden = self.conv1(F.silu(self.norm1(input_tensor), inplace=True))
    # A statement of its own, so conv1's output is freed before conv2 allocates its output.
    hidden = self.dropout(F.silu(self.norm2(hidden), inplace=True))
    hidden = self.conv2(hidden)
    shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
    return hidden.add_(shortcut)


def _decoder_forward_releasing(
    self: Decoder,
    sample: torch.Tensor,
    latent_embeds: torch.Tensor | None = None,
    *,
    between_blocks: Callable[[], object] | None = None,
) -> torch.Tensor:
    if latent_embeds is not None or torch.is_grad_enabled():
        return Decoder.forward(self, sample, latent_embeds)
    # The list is the only holder of the tensor between blocks, so the block that takes it out owns it.
    held = [self.mid_block(self.conv_in(sample), None)]
    for up_block in self.up_blocks:
        if between_blocks is not None:
            between_blocks()
        held.append(_up_block_releasing(up_block, held))
    return self.conv_out(self.conv_act(self.conv_norm_out(held.pop())))


def _up_block_releasing(block: torch.nn.Module, held: list[torch.Tensor]) -> torch.Tensor:
    """``block`` on the tensor it takes out of ``held``, which is freed once its first resnet returns.
    Anything but a hook-free ``UpDecoderBlock2D`` is called as it is (and holds its input throughout)."""
    if type(block) is not UpDecoderBlock2D or block._forward_hooks or block._forward_pre_hooks:
        return block(held.pop(), None)
    first, *rest = block.resnets
    hidden = first(held.pop(), temb=None)
    for resnet in rest:
        hidden = resnet(hidden, temb=None)
    for upsampler in block.upsamplers or ():
        hidden = upsampler(hidden)
    return hidden


def _plain_resnet(module: torch.nn.Module) -> bool:
    return (
        type(module) is ResnetBlock2D
        and module.time_emb_proj is None
        and module.upsample is None
        and module.downsample is None
        and module.time_embedding_norm != "scale_shift"  # the others just normalise without a temb
        and module.output_scale_factor == 1.0
        and type(module.nonlinearity) is torch.nn.SiLU
    )


def _plain_decoder(module: torch.nn.Module) -> bool:
    return (
        type(module) is Decoder
        and isinstance(module.conv_norm_out, torch.nn.GroupNorm)
        and type(module.conv_act) is torch.nn.SiLU
    )


def decoder_in_place(model: torch.nn.Module, between_blocks: Callable[[], object] | None = None) -> int:
    """Switch ``model``'s plain resnets and decoders (their up blocks' hand-over and output activation) to
    in place; returns how many modules were switched. A decoder calls ``between_blocks`` before each up
    block, when the previous block's temporaries have been freed (the engine hands the heap's free
    pages back there)."""
    switched = 0
    for module in model.modules():
        if "forward" in vars(module):
            continue
        if _plain_resnet(module):
            module.forward = types.MethodType(_resnet_forward_in_place, module)
            switched += 1
        elif _plain_decoder(module):
            module.conv_act.inplace = True
            module.forward = functools.partial(
                _decoder_forward_releasing, module, between_blocks=between_blocks
            )
            switched += 1
    return switched
