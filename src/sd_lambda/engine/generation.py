"""What a generation is, without torch: the names a request may choose and the parameters it resolves to.

The engine (torch) and the request model / client (no torch) both read these, so the client can be
installed and imported without the inference stack, and every choice is declared exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

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
# Response encodings: request name -> media type.
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


# Image-to-image's strength when a request with an init_image gives none.
DEFAULT_STRENGTH = 0.8
# Optional abilities an engine may offer (``Engine.features``); a request needing one it lacks is a 400.
FEATURES = ("init_image", "loras")


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA adapter a request applies: its name (as seeded) and its weight."""

    name: str
    scale: float


# Seeds are 32-bit: torch's manual_seed and OpenVINO's generator both take a seed modulo 2**32.
SEED_SPACE = 2**32


def image_seeds(seed: int, count: int) -> tuple[int, ...]:
    """The seed of each of ``count`` images: seed, seed+1, ..., wrapping within the 32-bit seed space so
    every seed a response reports can be sent back and gives the same image."""
    return tuple((seed + index) % SEED_SPACE for index in range(count))


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    negative_prompt: str | None = None
    scheduler: str | None = None  # a SCHEDULERS key; None = the engine's default
    decoder: str | None = None  # a DECODERS value; None = the engine's default
    num_images: int = 1  # images seeded seed, seed+1, ...
    # Image-to-image: the start image, already decoded, RGB and width x height (serving.init_image).
    init_image: Image.Image | None = None
    strength: float | None = None  # how far from init_image (DEFAULT_STRENGTH when None); unused without
    loras: tuple[LoraChoice, ...] = ()

    @property
    def seeds(self) -> tuple[int, ...]:
        return image_seeds(self.seed, self.num_images)


@dataclass(frozen=True)
class ModelDefaults:
    """Request defaults the model's own configuration implies."""

    width: int
    height: int
    num_inference_steps: int = 25
    guidance_scale: float = 7.5

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1


@dataclass
class GenerationResult:
    """What an engine returns: the images (image i from seed + i), where the time went, and what ran."""

    images: list[Image.Image]
    timings_ms: dict[str, float] = field(default_factory=dict)
    # What ran: unet_calls, unet_batch, scheduler, decoder, dtype, engine, and per-engine details.
    stats: dict[str, Any] = field(default_factory=dict)


def resolve_default_decoder(setting: str, tiny_available: bool, tiny_folder: str) -> str:
    """The decoder a request without one gets: SD_DEFAULT_DECODER, where auto means tiny when present."""
    if setting == "auto":
        return "tiny" if tiny_available else "full"
    if setting not in DECODERS:
        raise ValueError(f"SD_DEFAULT_DECODER={setting!r} is not one of auto, {', '.join(DECODERS)}")
    if setting == "tiny" and not tiny_available:
        raise ValueError(f"SD_DEFAULT_DECODER=tiny but the model has no {tiny_folder}/ folder")
    return setting


def resolve_default_scheduler(
    setting: str,
    model_scheduler: str,
    available: tuple[str, ...],
    replaces: dict[str, tuple[str, int]],
) -> tuple[str | None, str]:
    """The scheduler a request without one gets (None: the model's own) and why.

    ``replaces``: the engine's ``auto`` table, model scheduler class -> (a faster scheduler it offers,
    the steps that scheduler needs)."""
    if setting == "auto":
        replacement = replaces.get(model_scheduler)
        if replacement is None:
            return None, f"model's own {model_scheduler}"
        return replacement[0], f"{model_scheduler} replaced by {replacement[0]} (no warm-up UNet call)"
    if setting == "model":
        return None, f"SD_DEFAULT_SCHEDULER=model ({model_scheduler})"
    if setting not in SCHEDULERS:
        known = ", ".join(SCHEDULERS)
        raise ValueError(f"SD_DEFAULT_SCHEDULER={setting!r} is not one of auto, model, {known}")
    if setting not in available:
        raise ValueError(
            f"SD_DEFAULT_SCHEDULER={setting!r} is not available with this engine and model; "
            f"available: {', '.join(available)}"
        )
    return setting, "SD_DEFAULT_SCHEDULER"
