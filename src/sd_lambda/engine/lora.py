"""The torch engine's LoRA adapters: listed from the model's ``loras/`` on EFS, loaded the first time a
request names one and kept for the environment, and per generation exactly the requested ones active.

Loading goes through diffusers' ``load_lora_weights`` (PEFT injects a LoRA layer beside each targeted
module); ``set_adapters`` chooses the active adapters and their scales, ``disable_lora`` switches every
adapter off for a request that names none, so one request's adapters never reach the next.

Of the accelerations, only ``upsample_fold`` replaces modules a LoRA may target: the UNet's
``Upsample2D`` (its ``conv``, which LoCon-style adapters train). An adapter with tensors for those
convolutions would otherwise load without them, silently. So the UNet keeps both forms of each folded
upsampler: stock ``Upsample2D`` modules rebuilt from their stored kernels, which such an adapter loads
into, are in place for the requests that apply one, and the folded ones for every other request, which
therefore computes exactly what a fresh environment does (the two forms round differently in bf16).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sd_lambda.engine.generation import LoraChoice
from sd_lambda.layout import LayoutError, ModelPaths, lora_weights_file

logger = logging.getLogger(__name__)

# Tensor names of an adapter's text-encoder part, in diffusers' (text_encoder.) and kohya's (lora_te)
# formats: with one active, the prompt embeddings depend on the adapters.
TEXT_ENCODER_MARKS = ("text_encoder", "lora_te")
UPSAMPLER_MARK = "upsamplers"


def peft_missing_reason() -> str | None:
    """Why diffusers cannot load LoRA adapters here (it needs its PEFT backend), or None."""
    from diffusers.utils import USE_PEFT_BACKEND

    return None if USE_PEFT_BACKEND else "diffusers' PEFT backend is not available (install peft)"


@dataclass(frozen=True)
class LoadedAdapter:
    revision: str
    file: Path
    text_encoder: bool  # it has tensors for the text encoder


def peft_name(name: str) -> str:
    """The name PEFT keeps an adapter under: PEFT stores adapters in ``torch.nn.ModuleDict``s, whose keys
    may not contain a dot, which adapter names may (``sd1.5-style``). A digest of the name, so two
    public names never meet in one PEFT name."""
    return "lora_" + hashlib.sha256(name.encode()).hexdigest()[:16]


def tensor_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


@dataclass(frozen=True)
class UpsamplerForms:
    """One folded UNet upsampler (sd_lambda.engine.accel.upsample_fold) and its stock twin."""

    parent: torch.nn.Module
    child: str
    folded: torch.nn.Module
    stock: torch.nn.Module

    def use(self, stock: bool) -> None:
        setattr(self.parent, self.child, self.stock if stock else self.folded)


def upsampler_forms(model: torch.nn.Module) -> list[UpsamplerForms]:
    """A stock ``Upsample2D`` for every ``FoldedUpsample2D`` in ``model``, with the stored kernel in the
    folded module's dtype (nothing is swapped yet)."""
    from diffusers.models.upsampling import Upsample2D

    from sd_lambda.engine.accel.upsample_fold import FoldedUpsample2D

    forms = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, FoldedUpsample2D):
            continue
        parent_name, _, child = name.rpartition(".")
        weight, bias = module.stock_kernel
        stock = Upsample2D(
            module.channels, use_conv=True, out_channels=module.out_channels, bias=bias is not None
        )
        dtype = module.weight.dtype
        stock.conv.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            stock.conv.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
        forms.append(UpsamplerForms(model.get_submodule(parent_name), child, module, stock.eval()))
    return forms


class Adapters:
    """The adapters of the model in ``paths`` for ``pipeline``. Not thread-safe, like the engine."""

    def __init__(self, pipeline: Any, paths: ModelPaths | None) -> None:
        self.pipeline = pipeline
        self.paths = paths
        self.unavailable_reason = peft_missing_reason()
        self.loaded: dict[str, LoadedAdapter] = {}
        self.active: tuple[LoraChoice, ...] = ()
        # Accelerations that stepped aside for an adapter: name -> why.
        self.stepped_aside: dict[str, str] = {}
        # The adapters with tensors for the UNet's upsamplers, and both forms of each folded upsampler.
        self._upsampler_adapters: set[str] = set()
        self._upsamplers: list[UpsamplerForms] | None = None

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def names(self) -> tuple[str, ...]:
        """What a request may name now: the seeded ones, read again each time (a new seed is found
        without a reload), and those this environment holds already."""
        if not self.available:
            return ()
        seeded = self.paths.adapter_names() if self.paths is not None else []
        return tuple(sorted({*seeded, *self.loaded}))

    @property
    def text_encoder_active(self) -> bool:
        return any(self.loaded[choice.name].text_encoder for choice in self.active)

    def activate(self, choices: tuple[LoraChoice, ...]) -> None:
        """Exactly ``choices`` active for the next generation (none: every adapter off). A missing or
        unreadable adapter is a LayoutError (the service answers 503), with no adapter left active."""
        self.active = ()
        # First the modules, then the adapters' state: diffusers sets it on the modules in the UNet.
        self._use_stock_upsamplers(False)
        if not choices:
            if self.loaded:
                self.pipeline.disable_lora()
            return
        if not self.available:
            raise ValueError(f"LoRA adapters are not available: {self.unavailable_reason}")
        for choice in choices:
            self._load(choice.name)
        self._use_stock_upsamplers(any(c.name in self._upsampler_adapters for c in choices))
        self.pipeline.enable_lora()
        self.pipeline.set_adapters([peft_name(c.name) for c in choices], [c.scale for c in choices])
        self.active = choices

    def _load(self, name: str) -> None:
        if self.paths is None:
            raise LayoutError(f"no LoRA adapter {name!r}: this engine was loaded without a model folder")
        adapter = self.paths.adapter(name)
        if name in self.loaded:
            # An adapter's current moves (a new seed, a rollback) while the environment stays warm: one
            # readlink per request that names it keeps the served weights the seeded ones.
            if adapter.current_revision() == self.loaded[name].revision:
                return
            logger.info("lora %s: current moved from %s, loading again", name, self.loaded[name].revision)
            self._forget(name)
            self.loaded.pop(name)
            self._upsampler_adapters.discard(name)
        release = adapter.resolve_current()  # ModelNotSeededError is a LayoutError
        weights = lora_weights_file(release)
        try:
            names = tensor_names(weights)
        except (SafetensorError, OSError) as exc:
            raise LayoutError(f"unreadable LoRA adapter {name} ({weights}): {exc}") from exc
        upsamplers = any(UPSAMPLER_MARK in key for key in names)
        self._use_stock_upsamplers(upsamplers)  # loaded into the modules it targets
        try:
            self.pipeline.load_lora_weights(
                str(release), weight_name=weights.name, adapter_name=peft_name(name)
            )
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
            self._use_stock_upsamplers(False)
            self._forget(name)
            raise LayoutError(
                f"cannot load LoRA adapter {name} ({weights}): {type(exc).__name__}: {exc}"
            ) from exc
        text_encoder = any(mark in key for key in names for mark in TEXT_ENCODER_MARKS)
        if upsamplers and self._upsamplers:
            self._upsampler_adapters.add(name)
            reason = (
                f"stock upsamplers for requests with {', '.join(sorted(self._upsampler_adapters))} "
                "(tensors for the UNet's upsamplers); folded for every other request"
            )
            self.stepped_aside["upsample_fold"] = reason
            logger.info("engine acceleration upsample_fold steps aside: %s", reason)
        self.loaded[name] = LoadedAdapter(release.name, weights, text_encoder)
        logger.info(
            "lora %s loaded: revision %s, %d tensors%s",
            name,
            self.loaded[name].revision,
            len(names),
            ", text encoder too" if text_encoder else "",
        )

    def _use_stock_upsamplers(self, stock: bool) -> None:
        """The UNet's upsamplers in their stock form (``stock``) or folded as loaded (no-op when the
        UNet has none folded)."""
        if self._upsamplers is None:
            if not stock:
                return
            self._upsamplers = upsampler_forms(self.pipeline.unet)
        for forms in self._upsamplers:
            forms.use(stock)

    def _forget(self, name: str) -> None:
        """Drop what a failed load may have injected, so the name can load again later."""
        try:
            self.pipeline.delete_adapters(peft_name(name))
        except (ValueError, KeyError, AttributeError, RuntimeError) as exc:
            logger.info("lora %s: nothing to delete after the failed load (%s)", name, exc)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "available": list(self.names()),
            "loaded": {name: adapter.revision for name, adapter in self.loaded.items()},
        }
        if self.unavailable_reason:
            info["unavailable"] = self.unavailable_reason
        if self.stepped_aside:
            info["stepped_aside"] = dict(self.stepped_aside)
        return info
