"""DeepCache-style feature reuse for a diffusers ``UNet2DConditionModel``.

Adjacent denoising steps produce almost the same deep (low-resolution) UNet features. Every
``interval``-th UNet call runs in full and remembers the outputs of everything below the
highest-resolution level; the calls in between recompute only that level (``conv_in``, the first down
block's layers, the last up block) and reuse the remembered deep features (Ma et al., "DeepCache",
CVPR 2024, uniform schedule, branch 0). It is an approximation: the image changes slightly, so it is
opt-in (``SD_ACCEL=+feature_reuse``). The deep modules and the UNet get diffusers hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK = "sd_lambda.feature_reuse"
# The engine runs the full UNet every INTERVAL-th call.
INTERVAL = 2


class FeatureReuse:
    """Installed once on a UNet; ``start(interval)`` before each generation, ``stop()`` after it."""

    def __init__(self, unet: torch.nn.Module, interval: int = 1) -> None:
        self.default_interval = interval
        self.interval = 1
        self.calls = 0
        self.reused_calls = 0
        self.reusing = False
        first_down = unet.down_blocks[0]
        deep: list[torch.nn.Module] = [*(first_down.downsamplers or ()), *unet.down_blocks[1:]]
        deep += [unet.mid_block, *unet.up_blocks[:-1]]
        self.cache: dict[int, Any] = {}
        for index, module in enumerate(deep):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_ReuseOrRun(self, index), HOOK)
        HookRegistry.check_if_exists_or_initialize(unet).register_hook(_CountCalls(self), HOOK)

    def start(self, interval: int | None = None) -> None:
        interval = self.default_interval if interval is None else interval
        if interval < 1:
            raise ValueError(f"feature reuse interval must be >= 1, got {interval}")
        self.interval, self.calls, self.reused_calls = interval, 0, 0
        self.cache.clear()

    def stop(self) -> None:
        self.interval, self.reusing = 1, False
        self.cache.clear()


class _CountCalls(ModelHook):
    def __init__(self, owner: FeatureReuse) -> None:
        super().__init__()
        self.owner = owner

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict]:
        owner = self.owner
        owner.reusing = owner.interval > 1 and owner.calls % owner.interval != 0 and bool(owner.cache)
        owner.calls += 1
        owner.reused_calls += owner.reusing
        return args, kwargs


class _ReuseOrRun(ModelHook):
    def __init__(self, owner: FeatureReuse, index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        if owner.reusing:
            return owner.cache[self.index]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if owner.interval > 1:
            owner.cache[self.index] = output
        return output


class FeatureReuseAcceleration:
    """The registry's entry (sd_lambda.engine.accel.registry)."""

    @staticmethod
    def check(target: Any) -> str | None:
        unet = target.pipeline.unet
        if not all(hasattr(unet, name) for name in ("down_blocks", "mid_block", "up_blocks")):
            return f"{type(unet).__name__} has no down/mid/up blocks"
        if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2 or unet.mid_block is None:
            return "the UNet has a single resolution level: nothing deep to reuse"
        return None

    @staticmethod
    def apply(target: Any) -> str:
        target.state["feature_reuse"] = FeatureReuse(target.pipeline.unet, INTERVAL)
        return f"the full UNet every {INTERVAL} calls, the deep features reused between"
