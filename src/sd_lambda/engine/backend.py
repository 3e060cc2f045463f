"""Which engine serves a release, and the one interface every engine offers (no torch here).

An engine loads one release folder once (``load(model_dir, settings)``) and then turns
``GenerationParams`` into a ``GenerationResult`` many times; the serving layer sees only this interface,
so the request model, its defaults and its errors are the same whichever engine runs. Two engines:

- ``torch`` (sd_lambda.engine.torch_engine): diffusers on PyTorch, for safetensors releases, with the
  accelerations SD_ACCEL selects.
- ``openvino`` (sd_lambda.engine.openvino_engine): OpenVINO GenAI, for OpenVINO IR releases (as
  optimum-intel exports them; ``sd-lambda seed --export openvino``), no torch.

SD_ENGINE=auto picks by what the release holds (sd_lambda.layout.release_engine); torch or openvino
forces one, and a release that engine cannot read fails its load with a message naming both.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from sd_lambda.engine.generation import GenerationParams, GenerationResult, ModelDefaults
from sd_lambda.layout import OPENVINO_UNET, LayoutError, ModelPaths, release_engine
from sd_lambda.settings import Settings

# engine name -> (module, class); imported only when that engine is chosen.
ENGINE_CLASSES = {
    "torch": ("sd_lambda.engine.torch_engine", "Engine"),
    "openvino": ("sd_lambda.engine.openvino_engine", "OpenVINOEngine"),
}


class Engine(Protocol):
    """What the serving layer uses of a loaded engine. Not thread-safe: one generation at a time."""

    defaults: ModelDefaults
    load_seconds: float

    @property
    def schedulers(self) -> tuple[str, ...]: ...

    @property
    def decoders(self) -> tuple[str, ...]: ...

    @property
    def features(self) -> frozenset[str]:
        """The optional abilities (generation.FEATURES) this engine serves: init_image, loras."""
        ...

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapters a request may name now (``()`` when none)."""
        ...

    def generate(self, params: GenerationParams) -> GenerationResult: ...

    def describe(self) -> dict[str, Any]: ...


def engine_for(model_dir: Path, settings: Settings) -> tuple[str, str]:
    """The engine that serves ``model_dir`` and why."""
    holds = _release_engine_of(model_dir)
    if settings.engine == "auto":
        return holds, f"SD_ENGINE=auto; the release holds {_describe_release(holds)}"
    if settings.engine != holds:
        raise LayoutError(
            f"SD_ENGINE={settings.engine} but {model_dir} holds {_describe_release(holds)}, which the "
            f"{holds} engine serves: seed a {settings.engine} release or set SD_ENGINE=auto"
        )
    return settings.engine, f"SD_ENGINE={settings.engine}"


# What an image lacking an engine's libraries says (each image installs one engine: image/Dockerfile).
ENGINE_IMAGES = {"torch": "ENGINE=torch", "openvino": "ENGINE=openvino"}


def engine_class(name: str) -> Any:
    """The engine's class; a LayoutError when this install lacks its libraries (the other image)."""
    module, cls = ENGINE_CLASSES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise LayoutError(
            f"the {name} engine is not installed here ({exc.name or exc}): this release needs the image "
            f"built with make build-image {ENGINE_IMAGES[name]}, or seed a release for the installed engine"
        ) from exc


def load_engine(model_dir: Path, settings: Settings) -> Engine:
    """Load ``model_dir`` with the engine that serves it."""
    name, reason = engine_for(model_dir, settings)
    return engine_class(name).load(model_dir, settings, reason=reason)


def import_expected_engine(settings: Settings) -> str | None:
    """Import the engine the current release will need (its libraries take seconds to import), so the
    import happens in Lambda's init phase, not in the first request; None when nothing is seeded."""
    if settings.engine != "auto":
        name = settings.engine
    else:
        try:
            name = _release_engine_of(ModelPaths(settings.model_dir).resolve_current())
        except (LayoutError, OSError, RuntimeError):  # unseeded, unreadable, a symlink loop: the load says
            return None
    try:
        engine_class(name)
    except LayoutError:
        return None  # the first request's load says what is missing, as a 503
    return name


def _release_engine_of(folder: Path) -> str:
    return release_engine([OPENVINO_UNET] if (folder / OPENVINO_UNET).is_file() else [])


def _describe_release(engine: str) -> str:
    return f"OpenVINO IR ({OPENVINO_UNET})" if engine == "openvino" else "safetensors weights"
