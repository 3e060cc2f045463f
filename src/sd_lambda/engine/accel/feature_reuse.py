"""DeepCache-style feature reuse for a diffusers ``UNet2DConditionModel``.

Adjacent denoising steps produce almost the same deep (low-resolution) UNet features. Every
``interval``-th UNet call runs in full and remembers the outputs of everything below the
highest-resolution level; the calls in between recompute only that level (``conv_in``, the first down
block's layers, the last up block) and reuse the remembered deep features (Ma et al., "DeepCache",
CVPR 2024, uniform schedule, branch 0). It is an approximation: the image changes slightly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class FeatureReuse:
    """Installed once on a UNet; ``start(interval)`` before each generation, ``stop()`` after it."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.interval = 1
        self.calls = 0
        self.reused_calls = 0
        self._reusing = False
        first_down = unet.down_blocks[0]
        deep: list[torch.nn.Module] = [*(first_down.downsamplers or ()), *unet.down_blocks[1:]]
        deep += [unet.mid_block, *unet.up_blocks[:-1]]
        self._cache: dict[int, Any] = {}
        for index, module in enumerate(deep):
            module.forward = self._wrap(index, module.forward)
        unet.register_forward_pre_hook(self._before_unet_call)

    def start(self, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"feature reuse interval must be >= 1, got {interval}")
        self.interval, self.calls, self.reused_calls = interval, 0, 0
        self._cache.clear()

    def stop(self) -> None:
        self.interval, self._reusing = 1, False
        self._cache.clear()

    def _before_unet_call(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._reusing = self.interval > 1 and self.calls % self.interval != 0 and bool(self._cache)
        self.calls += 1
        self.reused_calls += self._reusing

    def _wrap(self, index: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        def reuse_or_run(*args: Any, **kwargs: Any) -> Any:
            if self._reusing:
                return self._cache[index]
            output = forward(*args, **kwargs)
            if self.interval > 1:
                self._cache[index] = output
            return output

        return reuse_or_run
