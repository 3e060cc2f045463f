"""Which diffusers pipelines the engine serves, and which of their components it loads.

``sd_lambda.engine.torch_engine`` loads every model with ``StableDiffusionPipeline.from_pretrained(...,
safety_checker=None)``. diffusers takes the class it is called on, not the folder's ``_class_name``, so an
SDXL or Flux folder would load (or half-load) and fail on the first request: seeding refuses it instead,
from ``model_index.json`` alone, before any weights move.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sd_lambda.layout import MODEL_INDEX, TINY_DECODER_FOLDER
from sd_lambda.seeding.errors import SeedError

# Folders whose model_index.json names one of these load as a StableDiffusionPipeline with their own
# components: SD 1.x/2.x (and distilled variants such as tiny-sd or sd-turbo) are StableDiffusionPipeline;
# diffusers' LatentConsistencyModelPipeline has the same components (an LCM scheduler and a
# guidance-embedding UNet, which the engine reads from the UNet's config).
SERVED_PIPELINE_CLASSES = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline")
# What StableDiffusionPipeline.from_pretrained loads, as the engine calls it. Its optional components
# (safety_checker, feature_extractor, image_encoder: diffusers' _optional_components) are never used:
# the engine passes safety_checker=None and has no image prompts.
SERVED_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")
# An OpenVINO release (optimum-intel's export layout) keeps the VAE as two IR folders while its
# model_index.json still lists ``vae``; the OpenVINO engine loads these, and the tiny decoder's IR.
OPENVINO_VAE_FOLDERS = ("vae_decoder", "vae_encoder")


def read_model_index(path: Path, where: str) -> dict[str, Any]:
    try:
        return parse_model_index(path.read_bytes(), where)
    except OSError as exc:
        raise SeedError(f"{where}: cannot read {MODEL_INDEX} ({exc.strerror or exc})") from exc


def parse_model_index(raw: bytes, where: str) -> dict[str, Any]:
    try:
        index = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SeedError(f"{where}: {MODEL_INDEX} is not JSON ({exc})") from exc
    if not isinstance(index, dict):
        raise SeedError(f"{where}: {MODEL_INDEX} is not a JSON object")
    return index


def check_served_class(index: Mapping[str, Any], where: str) -> None:
    """Refuse a pipeline the engine cannot serve, naming its class and the ones it can."""
    name = index.get("_class_name")
    if name not in SERVED_PIPELINE_CLASSES:
        raise SeedError(
            f"{where}: {MODEL_INDEX} names {name!r}, which the engine cannot serve "
            f"(it serves {' and '.join(SERVED_PIPELINE_CLASSES)}: Stable Diffusion 1.x/2.x-style models)"
        )


def served_components(index: Mapping[str, Any]) -> list[str]:
    """The components ``index`` lists that the engine loads: the only ones whose files are fetched."""
    return [component for component in SERVED_COMPONENTS if _present(index.get(component))]


def served_folders(index: Mapping[str, Any], engine: str) -> list[str]:
    """The folders of a release for ``engine`` (layout.ENGINES) that hold what ``index``'s served
    components are made of: the components themselves for torch; for OpenVINO, ``vae`` as its decoder and
    encoder IR, plus the tiny decoder's IR."""
    components = served_components(index)
    if engine == "torch":
        return components
    folders = [f for c in components for f in (OPENVINO_VAE_FOLDERS if c == "vae" else (c,))]
    return [*folders, TINY_DECODER_FOLDER]


def unused_components(index: Mapping[str, Any]) -> list[str]:
    """Components ``index`` lists that the engine never loads (their files are not fetched)."""
    return sorted(
        key
        for key, value in index.items()
        if not key.startswith("_") and key not in SERVED_COMPONENTS and _present(value)
    )


def without_unused(index: Mapping[str, Any]) -> dict[str, Any]:
    """``index`` with every unused component marked absent (``[null, null]``), so diffusers does not look
    for the folders that were not fetched (a listed feature_extractor/ that is missing fails the load)."""
    return {key: [None, None] if key in unused_components(index) else value for key, value in index.items()}


def _present(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and value[0] is not None and value[1] is not None
