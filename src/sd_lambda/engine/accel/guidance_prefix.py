"""Classifier-free guidance without computing the UNet's first layers twice.

A guided step runs the UNet on the latents stacked twice (``torch.cat([latents] * 2)``): one half
sees the prompt, the other the negative prompt. The prompts first enter at the first cross-attention,
so every layer before it gets the same input in both halves and computes the same output twice: in
SD 1.5 at 512², ``conv_in``, the first resnet, the first transformer's input projection and its
self-attention over 4,096 tokens, 41 GFLOP of a guided call's 1,538. Here those layers compute one
half and stack it twice (docs/performance.md has what that measured).

Each UNet call decides once, before it starts: only a plain call (latents, one timestep, prompt
embeddings, nothing else) whose two latent halves are equal is shared. Every prefix layer is then a
per-image function of the same input, so the result is what each half would compute on its own.
Several images per prompt stack as ``[images, images]``: the halves are then batches of images, shared
by the same rule.
Both parts are diffusers hooks: one on the UNet decides per call, one on each prefix layer halves it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

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


HOOK = "sd_lambda.guidance_prefix"


class SharedGuidancePrefix:
    """Installed once on a UNet; ``shared_calls`` counts the calls whose prefix ran once since ``start()``
    (the engine calls it before each generation)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.layers = guidance_prefix(unet)
        self.shared_calls = 0
        self.sharing = False
        self.batch = 0  # the shared call's batch (both halves)
        self.signature = inspect.signature(unet.forward)
        HookRegistry.check_if_exists_or_initialize(unet).register_hook(_DecidePerCall(self), HOOK)
        for layer in self.layers:
            HookRegistry.check_if_exists_or_initialize(layer).register_hook(_OnceForBothHalves(self), HOOK)

    def start(self) -> None:
        self.shared_calls = 0

    def stop(self) -> None:
        self.sharing = False

    @staticmethod
    def is_shareable(arguments: dict[str, Any]) -> bool:
        if any(value is not None for name, value in arguments.items() if name not in PLAIN_CALL_ARGUMENTS):
            return False
        sample, timestep = arguments["sample"], arguments.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1 and not _equal_halves(timestep):
            return False
        return sample.dim() == 4 and _equal_halves(sample)


class _DecidePerCall(ModelHook):
    def __init__(self, owner: SharedGuidancePrefix) -> None:
        super().__init__()
        self.owner = owner

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict]:
        owner = self.owner
        arguments = owner.signature.bind(*args, **kwargs).arguments
        owner.sharing = owner.is_shareable(arguments)
        owner.batch = int(arguments["sample"].shape[0])
        owner.shared_calls += owner.sharing
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.owner.sharing = False
        return output


class _OnceForBothHalves(ModelHook):
    def __init__(self, owner: SharedGuidancePrefix) -> None:
        super().__init__()
        self.owner = owner

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        forward = self.fn_ref.original_forward
        if not self.owner.sharing:
            return forward(*args, **kwargs)
        batch = self.owner.batch
        half = forward(
            *(_first_half(v, batch) for v in args),
            **{name: _first_half(v, batch) for name, v in kwargs.items()},
        )
        return torch.cat([half, half])


def _equal_halves(tensor: torch.Tensor) -> bool:
    half, odd = divmod(tensor.shape[0], 2)
    return half > 0 and not odd and torch.equal(tensor[:half], tensor[half:])


def _first_half(value: Any, batch: int) -> Any:
    """A layer's tensor arguments over the call's batch (hidden states, the time embedding) cut to
    their first half."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[: batch // 2]
    return value


class GuidancePrefix:
    """The registry's entry (sd_lambda.engine.accel.registry)."""

    @staticmethod
    def check(target: Any) -> str | None:
        unet = target.pipeline.unet
        if not hasattr(unet, "conv_in") or not hasattr(unet, "down_blocks"):
            return f"{type(unet).__name__} is not a UNet2DConditionModel-like UNet"
        if len(guidance_prefix(unet)) < 2:
            return "no layers run before the first cross-attention"
        return None

    @staticmethod
    def apply(target: Any) -> str:
        shared = SharedGuidancePrefix(target.pipeline.unet)
        target.state["guidance_prefix"] = shared
        return f"{len(shared.layers)} UNet layers before the first cross-attention run once per guided call"
