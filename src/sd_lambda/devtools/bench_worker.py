"""One benchmark variant in its own process, so its cold start and peak RSS are its own.

Run by ``sd-lambda bench`` as ``python -m sd_lambda.devtools.bench_worker '<json spec>'``; prints
one JSON line (the last line of stdout). Nothing heavy is imported before the clock starts.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# naive: stock diffusers as the source articles use it; fast, fast_lcm: the engine's user-visible
# defaults; accel:<selection>: the engine like-for-like with naive (full VAE, guidance 7.5) with the
# accelerations SD_ACCEL=<selection> selects, where -name/+name change the defaults
# (accel:-in_place+feature_reuse is SD_ACCEL=-in_place,+feature_reuse).
NAMED_VARIANTS = ("naive", "fast", "fast_lcm")
ACCEL_PREFIX = "accel:"
VARIANTS = ("naive", "accel:none", "accel:default", "accel:+feature_reuse", "fast", "fast_lcm")
FAST_VARIANTS = ("fast", "fast_lcm")
RESULT_PREFIX = "BENCH-RESULT "


def accel_switch(variant: str) -> str | None:
    """The SD_ACCEL value an ``accel:`` variant stands for (None for the named variants)."""
    if not variant.startswith(ACCEL_PREFIX):
        return None
    selection = variant.removeprefix(ACCEL_PREFIX)
    if selection[:1] in ("+", "-"):
        return ",".join(re.findall(r"[+-][^+-]+", selection))
    return selection


def check_variant(variant: str) -> None:
    """ValueError unless ``variant`` is a named variant or an ``accel:`` one SD_ACCEL accepts."""
    from sd_lambda.engine.accel import registry

    switch = accel_switch(variant)
    if switch is None:
        if variant not in NAMED_VARIANTS:
            raise ValueError(
                f"unknown variant {variant!r}; known: {', '.join(NAMED_VARIANTS)}, accel:<selection>"
            )
        return
    try:
        registry.resolve(switch)
    except ValueError as exc:
        raise ValueError(f"variant {variant!r}: {exc}") from None


def _naive(spec: dict[str, Any]) -> tuple[Callable[[], dict[str, Any]], dict[str, Any]]:
    """What the source articles do: from_pretrained with every default, fp32, full VAE, guidance 7.5."""
    import torch
    from diffusers import DiffusionPipeline

    from sd_lambda.engine.torch_engine import UnetRecorder

    pipe = DiffusionPipeline.from_pretrained(spec["model_dir"])
    # Measurement only: hooks count UNet calls and time the decode; they do not change the work.
    recorder = UnetRecorder(pipe.unet)
    decode_seconds = [0.0]
    vae_decode = pipe.vae.decode

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        output = vae_decode(*args, **kwargs)
        decode_seconds[0] = time.perf_counter() - started
        return output

    pipe.vae.decode = timed_decode

    def one_image() -> dict[str, Any]:
        recorder.reset()
        pipe(
            spec["prompt"],
            num_inference_steps=spec["steps"],
            guidance_scale=spec["guidance_scale"],
            width=spec["width"],
            height=spec["height"],
            generator=torch.Generator().manual_seed(spec["seed"]),
        )
        return {
            "unet_seconds": recorder.seconds,
            "unet_calls": recorder.calls,
            "unet_batch": recorder.batch,
            "decode_seconds": decode_seconds[0],
            "text_encoder_calls": 2 if recorder.batch == 2 else 1,
        }

    info = {"dtype": str(pipe.unet.dtype).removeprefix("torch."), "decoder": "full"}
    info["scheduler"] = type(pipe.scheduler).__name__
    return one_image, info


def _project(spec: dict[str, Any], variant: str) -> tuple[Callable[[], dict[str, Any]], dict[str, Any]]:
    from dataclasses import replace

    from sd_lambda.engine.torch_engine import Engine, GenerationParams

    fast = variant in FAST_VARIANTS
    settings = variant_settings(variant)
    if not fast:
        settings = replace(settings, default_decoder="full")
    engine = Engine.load(Path(spec["model_dir"]), settings)
    params = GenerationParams(
        prompt=spec["prompt"],
        num_inference_steps=spec["steps"],
        # Like-for-like keeps the naive guidance; the fast default takes what the model says it needs.
        guidance_scale=engine.defaults.guidance_scale if fast else spec["guidance_scale"],
        width=spec["width"],
        height=spec["height"],
        seed=spec["seed"],
    )

    def one_image() -> dict[str, Any]:
        result = engine.generate(params)
        return {
            "unet_seconds": result.timings_ms["unet"] / 1000,
            "unet_calls": result.stats["unet_calls"],
            "unet_batch": result.stats["unet_batch"],
            "decode_seconds": result.timings_ms["decode"] / 1000,
            "text_encoder_calls": 1 + bool(params.negative_prompt),
            "reused_calls": result.stats["reused_calls"],
            "prefix_shared_calls": result.stats["prefix_shared_calls"],
        }

    info = {
        "dtype": str(engine.pipeline.unet.dtype).removeprefix("torch."),
        "decoder": engine.choices.default_decoder,
        "scheduler": engine.describe()["default_scheduler"],
        "guidance_scale": params.guidance_scale,
        "weights": engine.choices.weights,
        "accelerations": list(engine.choices.accelerations),
        "skipped_accelerations": engine.choices.skipped_accelerations,
    }
    return one_image, info


def variant_settings(variant: str) -> Any:
    """The engine's settings for ``variant``: the environment's, with an ``accel:`` variant's SD_ACCEL."""
    from dataclasses import replace

    from sd_lambda.settings import Settings

    settings = Settings.from_env()
    switch = accel_switch(variant)
    return settings if switch is None else replace(settings, accel=switch)


PROC_SELF_STATUS = Path("/proc/self/status")


def status_bytes(field: str, status: Path = PROC_SELF_STATUS) -> int | None:
    """A memory field of this process's ``/proc/self/status`` (``VmHWM``, ``RssAnon``, ...) in bytes,
    or None where it does not say."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes(status: Path = PROC_SELF_STATUS) -> int:
    """This process's peak RSS: ``VmHWM``, which belongs to its own address space. ``ru_maxrss`` keeps
    the parent's peak across fork and exec, so a bench that had just written a 5 GB bf16 copy made
    every worker report at least that."""
    peak = status_bytes("VmHWM", status)
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(spec: dict[str, Any]) -> dict[str, Any]:
    variant = spec["variant"]
    check_variant(variant)
    started = time.perf_counter()
    prefetch = None
    # The engine's variants start the weight prefetch before their imports, as the handler's init does,
    # when their selection has it.
    settings = None if variant == "naive" else variant_settings(variant)
    if settings is not None and "prefetch" in settings.accelerations:
        from sd_lambda.engine.accel.prefetch import expects_bf16_copy, prefetch_model

        prefetch = prefetch_model(Path(spec["model_dir"]), bf16=expects_bf16_copy(settings))
    import diffusers  # noqa: F401  (what a handler imports at init, for both variants)
    import torch
    from diffusers import StableDiffusionPipeline  # noqa: F401

    import sd_lambda.engine.torch_engine  # noqa: F401

    imported = time.perf_counter()
    one_image, info = _naive(spec) if variant == "naive" else _project(spec, variant)
    loaded = time.perf_counter()
    # How far the prefetch got while importing and loading (it may still be reading).
    prefetch_at_load = prefetch.describe() if prefetch is not None else None
    images = []
    for _ in range(1 + spec["repeats"]):
        cpu_started, image_started = _cpu_seconds(), time.perf_counter()
        sample = one_image()
        sample["seconds"] = time.perf_counter() - image_started
        # CPU time of this process: a contention check (wall time inflates when other work shares the CPUs).
        sample["cpu_seconds"] = _cpu_seconds() - cpu_started
        images.append(sample)
    return {
        "variant": variant,
        "isa": spec["isa"],
        "import_seconds": imported - started,
        "load_seconds": loaded - imported,
        "first_image_seconds": images[0]["seconds"],
        "images": images,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "prefetch_at_load": prefetch_at_load,
        **info,
    }


def main(argv: list[str]) -> int:
    result = run(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
