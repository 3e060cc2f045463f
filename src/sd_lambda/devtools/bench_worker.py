"""One benchmark variant in its own process, so its cold start and peak RSS are its own.

Run by ``sd-lambda bench`` as ``python -m sd_lambda.devtools.bench_worker '<json spec>'``; prints
one JSON line (the last line of stdout). Nothing heavy is imported before the clock starts.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANTS = ("naive", "project", "reuse", "fast", "fast_lcm")
# Run on request (``sd-lambda bench --variants``): the fast default without the init's weight prefetch
# (also a default with ``--cold``), to show what the prefetch buys on a cold page cache.
# And the fast default from the model's stored weights, cast at load, not its bf16 copy (SD_BF16_COPY=0).
# And like-for-like with every UNet convolution on oneDNN (SD_SMALL_MAP_CONVS=0).
EXTRA_VARIANTS = ("fast_no_prefetch", "fast_no_bf16_copy", "project_no_small_map_convs")
ALL_VARIANTS = VARIANTS + EXTRA_VARIANTS
# Variants that start the weight prefetch before their imports, as the handler's init does: every engine
# variant but the one that measures going without it.
PREFETCHING = tuple(variant for variant in ALL_VARIANTS if variant not in ("naive", "fast_no_prefetch"))
FAST_VARIANTS = ("fast", "fast_lcm", "fast_no_prefetch", "fast_no_bf16_copy")
# Settings a variant changes from the environment's (the rest come from Settings.from_env()).
VARIANT_SETTINGS: dict[str, dict[str, Any]] = {
    "fast_no_bf16_copy": {"bf16_copy": 0},
    "project_no_small_map_convs": {"small_map_convs": 0},
}
FEATURE_REUSE_INTERVAL = 2
RESULT_PREFIX = "BENCH-RESULT "


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
        # "reuse" is "project" plus DeepCache-style feature reuse (opt-in: it changes the image).
        feature_reuse=FEATURE_REUSE_INTERVAL if variant == "reuse" else None,
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
        "feature_reuse": params.feature_reuse or settings.feature_reuse,
        "weights": engine.choices.weights,
        "small_map_convs": engine.choices.small_map_convs,
    }
    return one_image, info


def variant_settings(variant: str) -> Any:
    """The engine's settings for ``variant``: the environment's, with the variant's own changes."""
    from dataclasses import replace

    from sd_lambda.settings import Settings

    return replace(Settings.from_env(), **VARIANT_SETTINGS.get(variant, {}))


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
    if variant not in ALL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(ALL_VARIANTS)}")
    started = time.perf_counter()
    prefetch = None
    if variant in PREFETCHING:
        from sd_lambda.engine.accel.prefetch import expects_bf16_copy, prefetch_model

        bf16 = expects_bf16_copy(variant_settings(variant))
        prefetch = prefetch_model(Path(spec["model_dir"]), bf16=bf16)
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
