"""2x nearest-neighbour upsampling then a 3x3 convolution, computed without materialising the upsample.

In ``conv3x3(upsample2x(x))`` every output pixel sees only 2x2 distinct pixels of ``x``: its three
kernel rows fall on two input rows, which rows depending on whether the output row is even or odd
(and likewise for columns). So the output's four phases (even/odd row x even/odd column) are four
2x2 convolutions of ``x`` with kernels made of summed 3x3 taps, kept as one kernel with four times
the output channels; each phase is computed from its block and interleaved into the output before the
next one is. That is 16 multiply-adds per input pixel and
channel pair instead of 36, with the same terms summed in a different order. In SD 1.5 the
upsampling convolutions are 28% of the VAE decoder's FLOPs and 8% of the UNet's.

The four phases are blocks of output channels (phase-major), so in channels_last the interleave
copies runs of C contiguous values rather than single elements (docs/performance.md has what that
measured).

Row phase 0 (output row 2m) reads input rows m-1 and m with taps (w0, w1 + w2); phase 1 (row 2m+1)
reads rows m and m+1 with taps (w0 + w1, w2). Columns are the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D

# Rows: (phase, tap) of a folded 2-tap kernel; columns: the 3 taps of the original kernel.
_FOLD_1D = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _phase_major(matrix_2d: torch.Tensor) -> torch.Tensor:
    """Rows of a kron product, (row phase, row tap, col phase, col tap) -> (row phase, col phase, taps)."""
    return matrix_2d.reshape(2, 2, 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(16, -1)


# One matrix product folds every 3x3 kernel at once: (out * in, 9) @ (9, 16).
_FOLD = _phase_major(torch.kron(_FOLD_1D, _FOLD_1D)).T.contiguous()


def fold_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) kernel -> (4 * out, in, 2, 2): channel ``(2 * row phase + col phase) * out + o``."""
    out_channels, in_channels = weight.shape[:2]
    folded = weight.reshape(-1, 9) @ _FOLD.to(weight)  # sums of at most four taps
    folded = folded.view(out_channels, in_channels, 4, 4).permute(2, 0, 1, 3)
    return folded.reshape(4 * out_channels, in_channels, 2, 2)


def _conv_of(upsample: Upsample2D) -> torch.nn.Module | None:
    """diffusers names the conv ``conv`` or, in older checkpoints' layout, ``Conv2d_0``."""
    return upsample.conv if upsample.name == "conv" else upsample.Conv2d_0


class FoldedUpsample2D(torch.nn.Module):
    """Drop-in for a diffusers ``Upsample2D`` (nearest 2x, 3x3 conv, padding 1). An ``output_size`` other
    than twice the input (odd latent sizes in the UNet) takes the original path with the original
    kernel. That kernel is kept as a plain attribute, not a parameter: casts leave it as loaded (in the
    engine, memory-mapped with its pages dropped, so it costs memory only when an odd size needs it)
    and each such call casts it to the input's dtype, as the stock module's cast would have."""

    def __init__(self, upsample: Upsample2D) -> None:
        super().__init__()
        conv = _conv_of(upsample)
        self.channels = upsample.channels
        self.out_channels = conv.out_channels
        self.stock_kernel = (conv.weight.detach(), None if conv.bias is None else conv.bias.detach())
        with torch.no_grad():
            # Summed in fp32 whatever the stored dtype, so each folded tap is rounded once.
            folded = fold_kernel(conv.weight.float()).to(conv.weight.dtype)
            self.weight = torch.nn.Parameter(folded, requires_grad=False)
            bias = None if conv.bias is None else conv.bias.repeat(4)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(
        self, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        batch, _, height, width = hidden_states.shape
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if output_size is not None and tuple(output_size) != (2 * height, 2 * width):
            upsampled = F.interpolate(hidden_states, size=output_size, mode="nearest")
            weight, bias = (None if t is None else t.to(hidden_states.dtype) for t in self.stock_kernel)
            return F.conv2d(upsampled, weight, bias, padding=1)
        channels = self.out_channels
        # By strides, as the convolution decides: 1x1 inputs are "contiguous" in both formats.
        channels_last = hidden_states.stride(1) == 1 and hidden_states.stride(3) == hidden_states.shape[1]
        # Interleave in the input's memory format, so the next layer gets the layout it was tuned for.
        if channels_last:
            out = hidden_states.new_empty(batch, height, 2, width, 2, channels)
            target = out.permute(0, 2, 4, 5, 1, 3)  # (N, row phase, col phase, C, H, W) view
        else:
            out = hidden_states.new_empty(batch, channels, height, 2, width, 2)
            target = out.permute(0, 3, 5, 1, 2, 4)
        for row in (0, 1):
            for col in (0, 1):
                # One phase at a time: a quarter of the output alive besides it, not all four, at no
                # cost in speed (docs/performance.md).
                taps = slice((2 * row + col) * channels, (2 * row + col + 1) * channels)
                bias = None if self.bias is None else self.bias[taps]
                phase = F.conv2d(hidden_states, self.weight[taps], bias, padding=1)  # (N, C, H + 1, W + 1)
                target[:, row, col] = phase[:, :, row : row + height, col : col + width]
                del phase  # before the next phase's convolution allocates, not after
        if channels_last:
            return out.view(batch, 2 * height, 2 * width, channels).permute(0, 3, 1, 2)
        return out.view(batch, channels, 2 * height, 2 * width)


def foldable(module: torch.nn.Module) -> bool:
    if type(module) is not Upsample2D or not module.use_conv or module.use_conv_transpose:
        return False
    if not module.interpolate or module.norm is not None:
        return False
    conv = _conv_of(module)
    return (
        isinstance(conv, torch.nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def fold_upsamplers(model: torch.nn.Module) -> list[Upsample2D]:
    """Replace every foldable ``Upsample2D`` in ``model``; returns the replaced modules (their weights
    are no longer used)."""
    targets = [name for name, module in model.named_modules() if name and foldable(module)]
    replaced = []
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        replaced.append(getattr(parent, child))
        setattr(parent, child, FoldedUpsample2D(replaced[-1]))
    return replaced


class UpsampleFold:
    """The registry's entry (sd_lambda.engine.accel.registry): the UNet's and the full VAE's upsamplers.
    The replaced kernels' mapped pages are dropped (sd_lambda.engine.accel.weights)."""

    @staticmethod
    def check(target: Any) -> str | None:
        pipeline = target.pipeline
        if not any(foldable(m) for model in (pipeline.unet, pipeline.vae) for m in model.modules()):
            return "no diffusers Upsample2D with a nearest-2x upsample and a 3x3 conv"
        return None

    @staticmethod
    def apply(target: Any) -> str:
        from sd_lambda.engine.accel.weights import release_mapped_pages

        replaced = fold_upsamplers(target.pipeline.unet) + fold_upsamplers(target.pipeline.vae)
        release_mapped_pages(tensor for module in replaced for tensor in module.parameters())
        return f"{len(replaced)} upsample+conv pairs folded"
