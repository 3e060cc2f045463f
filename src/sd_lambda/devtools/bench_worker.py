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
# (accel:-in_place+feature_reuse is SD_ACCEL=-in_place,+feature_reuse); openvino: the OpenVINO engine
# like-for-like on an export of the same model; openvino_fast: its user-visible defaults;
# openvino_int8: those defaults on the int8 export.
OPENVINO_VARIANTS = ("openvino", "openvino_fast", "openvino_int8")
NAMED_VARIANTS = ("naive", "fast", "fast_lcm", *OPENVINO_VARIANTS)
ACCEL_PREFIX = "accel:"
TORCH_VARIANTS = ("naive", "accel:none", "accel:default", "accel:+feature_reuse", "fast", "fast_lcm")
VARIANTS = (*TORCH_VARIANTS, *OPENVINO_VARIANTS)
FAST_VARIANTS = ("fast", "fast_lcm", "openvino_fast", "openvino_int8")
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
    from sd_lambda.engine.torch_engine import Engine

    engine = Engine.load(Path(spec["model_dir"]), engine_settings(variant))
    params = request_params(spec, variant, engine.defaults.guidance_scale)
    one_image = _engine_image(engine, params)
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


def _openvino(spec: dict[str, Any], variant: str) -> tuple[Callable[[], dict[str, Any]], dict[str, Any]]:
    """The OpenVINO engine as the handler loads it (SD_ENGINE=openvino): torch is never imported."""
    from sd_lambda.engine.backend import load_engine

    engine = load_engine(Path(spec["model_dir"]), engine_settings(variant))
    params = request_params(spec, variant, engine.defaults.guidance_scale)
    described = engine.describe()
    info = {
        "dtype": described["dtype"],  # the inference precision; the int8 export's weights say int8
        "decoder": described["default_decoder"],
        "scheduler": described["default_scheduler"],
        "guidance_scale": params.guidance_scale,
        "weights": "IR",  # and how it stores them, read after the timed load and images
        "accelerations": [],
        "threads": described["threads"],
    }
    return _engine_image(engine, params), info


def engine_settings(variant: str) -> Any:
    """The engine's settings for a variant: like-for-like ones decode with the full VAE, as naive does."""
    from dataclasses import replace

    settings = variant_settings(variant)
    return settings if variant in FAST_VARIANTS else replace(settings, default_decoder="full")


def request_params(spec: dict[str, Any], variant: str, model_guidance: float) -> Any:
    from sd_lambda.engine.generation import GenerationParams

    return GenerationParams(
        prompt=spec["prompt"],
        num_inference_steps=spec["steps"],
        # Like-for-like keeps the naive guidance; the fast default takes what the model says it needs.
        guidance_scale=model_guidance if variant in FAST_VARIANTS else spec["guidance_scale"],
        width=spec["width"],
        height=spec["height"],
        seed=spec["seed"],
    )


def _engine_image(engine: Any, params: Any) -> Callable[[], dict[str, Any]]:
    """One image through either engine's ``generate``, with what the bench reads from its result."""

    def one_image() -> dict[str, Any]:
        result = engine.generate(params)
        # The OpenVINO engine compiles in generate a shape its load did not (the bench's is its default).
        compile_seconds = (
            {"compile_seconds": result.timings_ms["compile"] / 1000} if "compile" in result.timings_ms else {}
        )
        return {
            **compile_seconds,
            "timings_ms": result.timings_ms,
            "unet_seconds": result.timings_ms["unet"] / 1000,
            "unet_calls": result.stats["unet_calls"],
            "unet_batch": result.stats["unet_batch"],
            "decode_seconds": result.timings_ms["decode"] / 1000,
            "text_encoder_calls": 1 + bool(params.negative_prompt),
            # Torch-engine accelerations; the OpenVINO engine has neither.
            "reused_calls": result.stats.get("reused_calls", 0),
            "prefix_shared_calls": result.stats.get("prefix_shared_calls", 0),
        }

    return one_image


def variant_settings(variant: str) -> Any:
    """The engine's settings for ``variant``: the environment's, with an ``accel:`` variant's SD_ACCEL
    and an OpenVINO variant's SD_ENGINE=openvino."""
    from dataclasses import replace

    from sd_lambda.settings import Settings

    settings = Settings.from_env()
    if variant in OPENVINO_VARIANTS:
        return replace(settings, engine="openvino")
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
    settings = None if variant in ("naive", *OPENVINO_VARIANTS) else variant_settings(variant)
    if settings is not None and "prefetch" in settings.accelerations:
        from sd_lambda.engine.accel.prefetch import expects_bf16_copy, prefetch_model

        prefetch = prefetch_model(Path(spec["model_dir"]), bf16=expects_bf16_copy(settings))
    if variant in OPENVINO_VARIANTS:
        # What a handler serving an OpenVINO release imports at init: no torch, no diffusers.
        import openvino  # noqa: F401
        import openvino_genai  # noqa: F401

        import sd_lambda.engine.openvino_engine
    else:
        import diffusers  # noqa: F401  (what a handler imports at init, for naive and the torch engine)
        from diffusers import StableDiffusionPipeline  # noqa: F401

        import sd_lambda.engine.torch_engine  # noqa: F401

    imported = time.perf_counter()
    if variant == "naive":
        one_image, info = _naive(spec)
    elif variant in OPENVINO_VARIANTS:
        one_image, info = _openvino(spec, variant)
    else:
        one_image, info = _project(spec, variant)
    loaded = time.perf_counter()
    # The OpenVINO engine's import and load are meant to be torch-free: whether this process proves it,
    # after the load and after the images.
    torch_after_load = "torch" in sys.modules
    # How far the prefetch got while importing and loading (it may still be reading).
    prefetch_at_load = prefetch.describe() if prefetch is not None else None
    images: list[dict[str, Any]] = []
    for _ in range(1 + spec["repeats"]):
        cpu_started, image_started = _cpu_seconds(), time.perf_counter()
        sample = one_image()
        sample["seconds"] = time.perf_counter() - image_started
        # CPU time of this process: a contention check (wall time inflates when other work shares the CPUs).
        sample["cpu_seconds"] = _cpu_seconds() - cpu_started
        images.append(sample)
    peak = peak_rss_bytes()
    cached = None
    if variant in OPENVINO_VARIANTS:
        # A second load in this process finds the default shape in the compile cache the first one
        # wrote: what a load costs where CACHE_DIR survives (measured after the peak RSS is read).
        from sd_lambda.devtools.bench_openvino import stored_weights
        from sd_lambda.engine.backend import load_engine
        from sd_lambda.layout import OPENVINO_UNET

        cached = load_engine(Path(spec["model_dir"]), engine_settings(variant)).load_seconds
        info["weights"] = f"IR {stored_weights(Path(spec['model_dir']) / OPENVINO_UNET)}"
    return {
        "variant": variant,
        "isa": spec["isa"],
        "cached_load_seconds": cached,
        "torch_after_load": torch_after_load,
        "torch_after_images": "torch" in sys.modules,
        "import_seconds": imported - started,
        "load_seconds": loaded - imported,
        "first_image_seconds": images[0]["seconds"],
        "images": images,
        "peak_rss_bytes": peak,
        **_threads_and_isa(variant, info),
        "prefetch_at_load": prefetch_at_load,
        **info,
    }


def _threads_and_isa(variant: str, info: dict[str, Any]) -> dict[str, Any]:
    """The threads the variant computed with and the ISA ATen chose (torch variants only: the OpenVINO
    ones never import torch; the bench records their kernels separately)."""
    if variant in OPENVINO_VARIANTS:
        return {"threads": info.pop("threads"), "cpu_capability": None}
    import torch

    return {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main(argv: list[str]) -> int:
    result = run(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
