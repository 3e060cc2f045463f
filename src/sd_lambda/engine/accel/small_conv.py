"""fp32 convolutions over small feature maps run as im2col + BLAS instead of oneDNN.

PyTorch hands oneDNN plain-layout weights, and oneDNN reorders the whole kernel into its blocked
layout on every call (``ONEDNN_VERBOSE``, a 1280-channel 3x3 kernel at 8x8 on an AVX2 Zen 3: 39.5 ms of
reorder, then 18.2 ms of convolution). Over a 64x64 map that is spread over 4,096 pixels; at SD 1.5's
16x16 and 8x8 UNet levels it is not. Measured there in fp32, per convolution of one UNet call, torch's
own kernel (``thnn_conv2d``: im2col, then one MKL sgemm per image) was 1.3-2.9x faster at batch 1 and
0.95-2.5x as fast at batch 2 up to 256 output pixels per image, and was slower above (0.6-1.0x at 32x32).
The same multiply-adds, summed in another order. One image per call: by its source, ``thnn_conv2d``
runs a batch's images in parallel, one thread each, so at batch 2 it would leave four of Lambda's six
vCPUs idle (not measured: this machine has two); image by image, MKL's sgemm gets every thread, and
here that measured as fast or faster (16x16 x 2560 channels at batch 2: 246 ms against 321 ms).
"""

from __future__ import annotations

from typing import Any

import torch

# Output pixels per image up to which the im2col kernel measured faster (a 16x16 map; 32x32 was slower).
MAX_OUTPUT_PIXELS = 16 * 16


def output_pixels(height: int, width: int, conv: torch.nn.Conv2d) -> int:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return ((height + 2 * ph - kh) // sh + 1) * ((width + 2 * pw - kw) // sw + 1)


def routable(conv: torch.nn.Module) -> bool:
    """What ``thnn_conv2d`` computes: a dense (groups=1, dilation 1) convolution, zero padding given as
    numbers, a kernel larger than 1x1 (1x1 convolutions measured no faster)."""
    return (
        type(conv) is torch.nn.Conv2d
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.kernel_size != (1, 1)
    )


class SmallMapConv2d(torch.nn.Conv2d):
    """A ``Conv2d`` that takes the im2col kernel for fp32, NCHW inputs with few output pixels, one image
    at a time; every other call (bf16, channels_last, larger maps) is the stock path. Same parameters,
    same state dict."""

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if (
            input.dtype == torch.float32
            and input.dim() == 4
            and input.shape[0] > 0
            and input.is_contiguous()
            and output_pixels(input.shape[-2], input.shape[-1], self) <= MAX_OUTPUT_PIXELS
        ):
            images = [
                torch._C._nn.thnn_conv2d(image, weight, self.kernel_size, bias, self.stride, self.padding)
                for image in input.split(1)
            ]
            return images[0] if len(images) == 1 else torch.cat(images)
        return super()._conv_forward(input, weight, bias)


def route_small_map_convs(model: torch.nn.Module) -> int:
    """Switch ``model``'s routable convolutions to ``SmallMapConv2d`` in place; returns how many."""
    routed = 0
    for module in model.modules():
        if routable(module):
            module.__class__ = SmallMapConv2d
            routed += 1
    return routed


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
