"""What a model folder says about a request's defaults, read from its config files (no torch).

Both engines serve the same request defaults for the same model: size from the UNet's sample size and
the decoder's upsampling stages, steps and guidance from what the configuration says about guidance.
A folder may carry ``sd-lambda-defaults.json`` (keys of ``ModelDefaults``) to state its own, e.g.
``{"guidance_scale": 0.0, "num_inference_steps": 1}`` for a turbo model. Without it: an LCM scheduler
or a guidance-embedding UNet means no classifier-free guidance; "turbo" in the model's source name
means 1 step, guidance 0.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from sd_lambda.engine.generation import ModelDefaults

DEFAULTS_MARKER = "sd-lambda-defaults.json"
# The decoder's config: diffusers' folder (vae/) or optimum-intel's OpenVINO export (vae_decoder/).
_DECODER_CONFIGS = ("vae/config.json", "vae_decoder/config.json")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def read_key(path: Path, key: str) -> Any:
    """``key`` of the JSON object in ``path``; a ValueError naming both when it is not there."""
    data = read_json(path)
    if key not in data:
        raise ValueError(f"{path} has no {key!r}")
    return data[key]


def scheduler_class(model_dir: Path) -> str:
    return str(read_json(model_dir / "scheduler" / "scheduler_config.json").get("_class_name"))


def vae_scale_factor(model_dir: Path) -> int:
    """Pixels per latent, as diffusers' StableDiffusionPipeline computes it from the decoder's config."""
    for name in _DECODER_CONFIGS:
        if (model_dir / name).is_file():
            return 2 ** (len(read_key(model_dir / name, "block_out_channels")) - 1)
    raise ValueError(f"{model_dir} has no decoder config ({' or '.join(_DECODER_CONFIGS)})")


def read_model_defaults(model_dir: Path, steps: int | None = None) -> ModelDefaults:
    """Defaults from the marker file, else from what the model's configuration says about guidance.
    ``steps``: the engine's default step count (its default scheduler's), when it has one."""
    unet_config = read_json(model_dir / "unet" / "config.json")
    side = int(read_key(model_dir / "unet" / "config.json", "sample_size")) * vae_scale_factor(model_dir)
    values: dict[str, Any] = {"width": side, "height": side}
    if steps is not None:
        values["num_inference_steps"] = steps
    source = model_source(model_dir).lower()
    if unet_config.get("time_cond_proj_dim") is not None:
        # Guidance is an input embedding (LCM-distilled): no unconditional batch, w = 8.5 as trained.
        values.update(num_inference_steps=4, guidance_scale=8.5)
    elif scheduler_class(model_dir) == "LCMScheduler":
        values.update(num_inference_steps=4, guidance_scale=1.0)
    elif "turbo" in source:
        values.update(num_inference_steps=1, guidance_scale=0.0)
    marker = model_dir / DEFAULTS_MARKER
    if marker.is_file():
        known = {f.name for f in fields(ModelDefaults)}
        data = read_json(marker)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{marker}: unknown keys {unknown}; allowed: {sorted(known)}")
        values.update(data)
    return ModelDefaults(**values)


def model_source(model_dir: Path) -> str:
    for name, key in (("manifest.json", "source"), ("model_index.json", "_name_or_path")):
        try:
            value = json.loads((model_dir / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return str(value)
    return model_dir.resolve().name
