"""fp32 convolutions over small feature maps run in torch's im2col + BLAS kernel instead of oneDNN.

PyTorch hands oneDNN plain-layout weights, and oneDNN reorders the whole kernel into its blocked
layout on every call. Over a 64x64 map that cost is spread over 4,096 pixels; at SD 1.5's 16x16 and
8x8 UNet levels it is not, and torch's own kernel (``slow_conv2d``: im2col, then one sgemm per image)
is faster there. The same multiply-adds, summed in another order. ATen picks that kernel for a
convolution when oneDNN is switched off (``torch.backends.mkldnn.enabled``), so each routed
``Conv2d`` gets a diffusers hook that switches it off around its own call. One image per call: by its
source, the kernel runs a batch's images in parallel, one thread each, which would leave most of
Lambda's vCPUs idle at batch 2; image by image, the sgemm gets every thread. docs/performance.md has
what this measured and up to which map size.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK = "sd_lambda.small_map_convs"
# Output pixels per image up to which the im2col kernel measured faster (a 16x16 map; 32x32 was slower).
MAX_OUTPUT_PIXELS = 16 * 16


def output_pixels(height: int, width: int, conv: torch.nn.Conv2d) -> int:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return ((height + 2 * ph - kh) // sh + 1) * ((width + 2 * pw - kw) // sw + 1)


def routable(conv: torch.nn.Module) -> bool:
    """What the im2col kernel computes: a dense (groups=1, dilation 1) convolution, zero padding given
    as numbers, a kernel larger than 1x1 (1x1 convolutions measured no faster)."""
    return (
        type(conv) is torch.nn.Conv2d
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.kernel_size != (1, 1)
    )


class SmallMapConv(ModelHook):
    """fp32, NCHW inputs with few output pixels: the im2col kernel, one image at a time. Every other call
    (bf16, channels_last, larger maps) is the stock forward, oneDNN included."""

    def new_forward(self, module: torch.nn.Conv2d, input: torch.Tensor) -> torch.Tensor:
        forward = self.fn_ref.original_forward
        if not (
            input.dtype == torch.float32
            and input.dim() == 4
            and input.shape[0] > 0
            and input.is_contiguous()
            and output_pixels(input.shape[-2], input.shape[-1], module) <= MAX_OUTPUT_PIXELS
        ):
            return forward(input)
        onednn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            images = [forward(image) for image in input.split(1)]
        finally:
            torch.backends.mkldnn.enabled = onednn
        return images[0] if len(images) == 1 else torch.cat(images)


def route_small_map_convs(model: torch.nn.Module) -> int:
    """Register the routing hook on ``model``'s routable convolutions; returns how many."""
    routed = 0
    for module in model.modules():
        if routable(module) and HOOK not in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(SmallMapConv(), HOOK)
            routed += 1
    return routed


def is_routed(module: torch.nn.Module) -> bool:
    return HOOK in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})


class SmallMapConvs:
    """The registry's entry (sd_lambda.engine.accel.registry): the UNet, in fp32 only."""

    @staticmethod
    def check(target: Any) -> str | None:
        if target.dtype != torch.float32:
            return f"runs {str(target.dtype).removeprefix('torch.')}: the im2col kernel pays only in fp32"
        if not any(routable(module) for module in target.pipeline.unet.modules()):
            return "the UNet has no dense convolutions larger than 1x1"
        return None

    @staticmethod
    def apply(target: Any) -> str:
        return f"{route_small_map_convs(target.pipeline.unet)} UNet convolutions routed"
