"""What a generation is, without torch: the names a request may choose and the parameters it resolves to.

The engine (torch) and the request model / client (no torch) both read these, so the client can be
installed and imported without the inference stack, and every choice is declared exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

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
