"""Write a bf16 copy of a model's weights beside the stored ones, once, before it is served.

A host with native bf16 runs the model in bf16. From fp32 files it maps 4.3 GB (SD 1.5) and casts
every tensor at load: CPU time in every cold start, and on Lambda twice the bytes EFS has to deliver.
With ``<stem>.bf16.safetensors`` beside each component's weights (the name diffusers loads with
``variant="bf16"``), the engine maps the copy as stored: half the bytes, no cast. The copy holds what
a cast at load would make, except the folded upsample kernels (sd_lambda.engine.accel.upsample_fold),
which then sum rounded taps (within a bf16 rounding of each other). Hosts that run fp32 keep loading
the stored files, so for them a copy costs disk (half the model again) and nothing else.
``sd-lambda seed --bf16-copy`` adds one to a release; the bench's test model has one. The engine
loads it when the ``bf16_copy`` acceleration is selected (``Bf16Copy`` below).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd_lambda.layout import (
    BF16_COPY_COMPONENTS,
    BF16_VARIANT,
    LayoutError,
    bf16_copy_files,
    bf16_copy_path,
    single_weights_file,
)


def stored_weights(model_dir: Path) -> dict[str, Path]:
    """Each copied component's one weights file (component -> path); LayoutError if one has none, more
    than one, or sharded weights (a copy of those would need its own shard index: not supported)."""
    found = {}
    for name in BF16_COPY_COMPONENTS:
        stored = single_weights_file(model_dir / name)
        if stored is None:
            raise LayoutError(f"{model_dir / name}: a bf16 copy needs exactly one unsharded weights file")
        found[name] = stored
    return found


def write_bf16_copy(weights: Path, copy: Path | None = None) -> Path:
    """Write ``weights`` with every floating-point tensor in bf16 (others as stored) to ``copy``
    (default: beside it, as ``<stem>.bf16.safetensors``); returns the path written. Holds the bf16 copy
    and one stored tensor in memory; the file appears whole or not at all."""
    copy = copy or bf16_copy_path(weights)
    tensors = {}
    with safe_open(weights, framework="pt") as stored:
        metadata = stored.metadata()
        for key in stored.keys():  # noqa: SIM118  (safe_open is not a mapping)
            tensor = stored.get_tensor(key)
            tensors[key] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    partial = copy.with_name(copy.name + ".partial")
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, copy)
    return copy


def add_bf16_copy(model_dir: Path) -> list[Path]:
    """Give ``model_dir`` a bf16 copy of each component that lacks one, or whose copy is older than its
    weights; returns the copies written."""
    written = []
    for weights in stored_weights(model_dir).values():
        copy = bf16_copy_path(weights)
        if not copy.is_file() or copy.stat().st_mtime < weights.stat().st_mtime:
            written.append(write_bf16_copy(weights))
    return written


class Bf16Copy:
    """The registry's entry (sd_lambda.engine.accel.registry): load the copy instead of the stored weights."""

    @staticmethod
    def check(target: Any) -> str | None:
        if target.dtype != torch.bfloat16:
            return f"runs {str(target.dtype).removeprefix('torch.')}: the stored weights are what it needs"
        if bf16_copy_files(target.model_dir) is None:
            return "the model has no complete bf16 copy (seed --bf16-copy)"
        return None

    @staticmethod
    def apply(target: Any) -> str:
        target.load_options.update(variant=BF16_VARIANT, dtype=target.dtype)
        return "weights mapped from the bf16 copy, as stored"
