"""The text-to-image engine: load a diffusers folder once, generate many images.

The handler owns HTTP and validation; this module owns torch. ``Engine.load`` does every piece of
work that does not depend on a request, so ``Engine.generate`` is as short as it can be.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sd_lambda.layout import LayoutError, find_pickle_weights
from sd_lambda.settings import Settings

# Request-selectable schedulers: public name -> diffusers class name.
SCHEDULERS: dict[str, str] = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
}
DECODERS = ("full", "tiny")


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    negative_prompt: str | None = None
    scheduler: str | None = None  # a SCHEDULERS key; None = the model's own
    decoder: str | None = None  # a DECODERS value; None = the engine's default


@dataclass(frozen=True)
class ModelDefaults:
    """Request defaults the model's own configuration implies."""

    width: int
    height: int
    num_inference_steps: int = 25
    guidance_scale: float = 7.5


@dataclass
class GenerationResult:
    image: Image.Image
    timings_ms: dict[str, float] = field(default_factory=dict)


class Engine:
    """One loaded pipeline. Not thread-safe: one generation at a time, like one Lambda environment."""

    def __init__(self, pipeline: Any, model_dir: Path, load_seconds: float) -> None:
        self.pipeline = pipeline
        self.model_dir = model_dir
        self.load_seconds = load_seconds
        self._schedulers = {"default": pipeline.scheduler}
        scale = pipeline.vae_scale_factor
        self.defaults = ModelDefaults(
            width=pipeline.unet.config.sample_size * scale, height=pipeline.unet.config.sample_size * scale
        )

    @classmethod
    def load(cls, model_dir: Path, settings: Settings | None = None) -> Engine:
        from diffusers import StableDiffusionPipeline

        settings = settings or Settings.from_env()
        started = time.perf_counter()
        pickles = find_pickle_weights(model_dir)
        if pickles:
            raise LayoutError(f"refusing pickle weights in {model_dir}: {', '.join(pickles)}")
        pipeline = StableDiffusionPipeline.from_pretrained(
            model_dir, use_safetensors=True, safety_checker=None, requires_safety_checker=False
        )
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, model_dir, time.perf_counter() - started)

    @property
    def schedulers(self) -> tuple[str, ...]:
        return tuple(SCHEDULERS)

    @property
    def decoders(self) -> tuple[str, ...]:
        return ("full",)

    def describe(self) -> dict[str, Any]:
        return {
            "dtype": str(self.pipeline.unet.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "decoders": list(self.decoders),
            "schedulers": list(self.schedulers),
            "load_seconds": round(self.load_seconds, 3),
        }

    def _scheduler(self, name: str | None) -> Any:
        if name is None:
            return self._schedulers["default"]
        if name not in self._schedulers:
            import diffusers

            scheduler_class = getattr(diffusers, SCHEDULERS[name])
            self._schedulers[name] = scheduler_class.from_config(self._schedulers["default"].config)
        return self._schedulers[name]

    @torch.inference_mode()
    def generate(self, params: GenerationParams) -> GenerationResult:
        started = time.perf_counter()
        self.pipeline.scheduler = self._scheduler(params.scheduler)
        image = self.pipeline(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            width=params.width,
            height=params.height,
            generator=torch.Generator().manual_seed(params.seed),
        ).images[0]
        return GenerationResult(image, {"inference": (time.perf_counter() - started) * 1000})
