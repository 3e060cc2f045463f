"""Classifier-free guidance without computing the UNet's first layers twice.

A guided step runs the UNet on the latents stacked twice (``torch.cat([latents] * 2)``): one half
sees the prompt, the other the negative prompt. The prompts first enter at the first cross-attention,
so every layer before it gets the same input in both halves and computes the same output twice: in
SD 1.5 at 512², ``conv_in``, the first resnet, the first transformer's input projection and its
self-attention over 4,096 tokens, 41 GFLOP of a guided call's 1,538. Here those layers compute one
half and stack it twice. One guided SD 1.5 call at 512², medians of four alternating calls in one
process: 8.15 -> 7.76 s in fp32 under AVX2, 3.22 -> 3.12 s in bf16 (each shared call was faster
than the stock one before it).

Each UNet call decides once, before it starts: only a plain call (latents, one timestep, prompt
embeddings, nothing else) whose two latent halves are equal is shared. Every prefix layer is then a
per-image function of the same input, so the result is what each half would compute on its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

# The arguments of UNet2DConditionModel.forward a shared call may carry; anything else (class labels,
# added conditions, attention kwargs, adapter residuals) could differ between the halves.
PLAIN_CALL_ARGUMENTS = frozenset({"sample", "timestep", "encoder_hidden_states", "return_dict"})


def guidance_prefix(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers that run before the UNet's first cross-attention, in order: ``conv_in``, then the
    down blocks' resnets and downsamplers up to the first block with attention, that block's first
    resnet, its transformer's input projection and its first transformer block's self-attention."""
    return [unet.conv_in, *_until_first_cross_attention(unet.down_blocks)]


def _until_first_cross_attention(down_blocks: torch.nn.ModuleList) -> Iterator[torch.nn.Module]:
    for block in down_blocks:
        attentions = getattr(block, "attentions", None) or ()
        for index, resnet in enumerate(block.resnets):
            yield resnet
            if index < len(attentions):
                transformer = attentions[index]
                blocks = getattr(transformer, "transformer_blocks", None)
                if blocks is None:  # not a Transformer2DModel: where the prompt enters is unknown
                    return
                yield transformer.proj_in
                if not blocks[0].only_cross_attention:  # else its attn1 already takes the prompt
                    yield blocks[0].attn1
                return
        yield from block.downsamplers or ()


class SharedGuidancePrefix:
    """Installed once on a UNet; ``shared_calls`` counts the calls whose prefix ran once (the engine
    resets it per generation)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.layers = guidance_prefix(unet)
        self.shared_calls = 0
        self._sharing = False
        self._signature = inspect.signature(unet.forward)
        for layer in self.layers:
            layer.forward = self._wrap(layer.forward)
        unet.register_forward_pre_hook(self._before_unet_call, with_kwargs=True)
        unet.register_forward_hook(self._after_unet_call)

    def _before_unet_call(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._sharing = self._is_shareable(self._signature.bind(*args, **kwargs).arguments)
        self.shared_calls += self._sharing

    def _after_unet_call(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._sharing = False

    @staticmethod
    def _is_shareable(arguments: dict[str, Any]) -> bool:
        if any(value is not None for name, value in arguments.items() if name not in PLAIN_CALL_ARGUMENTS):
            return False
        sample, timestep = arguments["sample"], arguments.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1 and not _equal_halves(timestep):
            return False
        return sample.dim() == 4 and _equal_halves(sample)

    def _wrap(self, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def once_for_both_halves(*args: Any, **kwargs: Any) -> torch.Tensor:
            if not self._sharing:
                return forward(*args, **kwargs)
            half = forward(*map(_first_half, args), **{name: _first_half(v) for name, v in kwargs.items()})
            return torch.cat([half, half])

        return once_for_both_halves


def _equal_halves(tensor: torch.Tensor) -> bool:
    return tensor.shape[0] == 2 and torch.equal(tensor[0], tensor[1])


def _first_half(value: Any) -> Any:
    """A layer's batch-2 tensor arguments (hidden states, the time embedding) cut to their first image."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2:
        return value[:1]
    return value
