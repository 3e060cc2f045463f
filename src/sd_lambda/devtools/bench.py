"""sd-lambda bench: the project's pipeline against the naive one, in one run, on this machine.

Variants (same prompt, seed, size and steps; each run in its own process, alternating):
  naive       what the source articles do: DiffusionPipeline.from_pretrained, fp32, full VAE,
              default threads, guidance 7.5, the model's own scheduler;
  accel:SEL   the engine the handler uses, like-for-like (guidance 7.5, full decoder), with the
              accelerations SD_ACCEL=SEL selects: accel:none (stock diffusers modules), accel:default,
              accel:all, accel:-name (the defaults without one), accel:+name (the defaults and an
              opt-in one); accel:each stands for none, default and every -name / +name;
  fast        the engine's user-visible defaults: tiny decoder when the model has one, the guidance the
              model's configuration asks for (an SD 1.5 model still needs classifier-free guidance);
  fast_lcm    the same defaults on the same weights configured with an LCM scheduler, which is what an
              LCM-LoRA-fused SD 1.5 runs (same UNet, no classifier-free guidance). The timing is that
              model's; the image quality is not (random weights);
  openvino    the OpenVINO engine (SD_ENGINE=openvino) like-for-like (guidance 7.5, full decoder, the
              same steps and UNet calls: Euler where torch runs DPM-Solver++ 2M, which GenAI lacks) on
              an OpenVINO IR export of the same model, made once;
  openvino_fast  the OpenVINO engine's user-visible defaults on that export;
  openvino_int8  the same defaults on the int8 export (NNCF; it changes the image).
Each variant runs under --isa native and/or --isa avx2 (ATen, oneDNN, MKL and OpenVINO's own kernels
capped at AVX2, the only vector ISA AWS Lambda documents). For the OpenVINO variants the report adds
which kernels ran each UNet layer type (OpenVINO's profiling info) and a plot of s/image next to the
JSON. With accel:default and accel:-name / accel:+name variants, the
report adds each acceleration's gain (s/image, peak RSS) and the run-to-run spread over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sd_lambda.devtools import bench_openvino, bench_peak
from sd_lambda.devtools.bench_worker import (
    ACCEL_PREFIX,
    NAMED_VARIANTS,
    OPENVINO_VARIANTS,
    RESULT_PREFIX,
    VARIANTS,
    check_variant,
)
from sd_lambda.engine import cpu

# Each library that picks its own kernels from the CPU gets the cap: ATen, oneDNN (torch's and the copy
# inside OpenVINO's CPU plugin, with its JIT kernels), MKL (the BLAS of torch's linear layers and im2col
# convolutions) and OpenVINO's own ISA dispatch (OV_CPU_MAX_ISA, read by libopenvino since 2026.x; its
# docs ask for the same value as ONEDNN_MAX_CPU_ISA). MLAS, which runs OpenVINO's fp32 FullyConnected
# layers, detects the CPU itself and has no cap: the kernel record shows what ran.
ISA_ENV: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "OV_CPU_MAX_ISA": "AVX2",
    },
}
DEFAULT_CACHE = Path(".cache/models")
NAIVE_GUIDANCE = 7.5
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
# Targets from the performance issue (SD 1.5 architecture, 512x512, 4 steps).
TARGETS = {"accel:default_speedup": {"avx2": 1.3, "native": 1.8}, "fast_speedup": 3.0}
TARGET_PEAK_RSS_GB = 5.5
TARGET_IMPORT_LOAD_SECONDS = 4.0
# Targets of the OpenVINO issue: its like-for-like against the torch engine's (same run, same ISA), and
# import + load of the torch-free runtime; each OpenVINO variant's peak RSS at most its torch counterpart's.
TARGET_OPENVINO_OVER_TORCH = 1.35
TARGET_OPENVINO_IMPORT_LOAD_SECONDS = 1.5
TORCH_COUNTERPART = {"openvino": "accel:default", "openvino_fast": "fast", "openvino_int8": "fast"}
# The OpenVINO variants' models: variant -> the export's quantisation (None: the float export, its
# weights stored in the exporter's default format, fp16).
OPENVINO_EXPORTS: dict[str, str | None] = {"openvino": None, "openvino_fast": None, "openvino_int8": "int8"}
WORKER_TIMEOUT_SECONDS = 3600
LCM_VIEW_MARKER = ".sd-lambda-bench-lcm-view"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# --cold without --variants: naive against the defaults without and with the weight prefetch.
COLD_VARIANTS = ("naive", "accel:default", "accel:+prefetch")
EACH = "accel:each"


def each_acceleration() -> tuple[str, ...]:
    """``accel:each``: stock, the defaults, and the defaults without each default / with each opt-in."""
    from sd_lambda.engine.accel import registry

    changes = [f"{'-' if a.default else '+'}{a.name}" for a in registry.ACCELERATIONS]
    return ("accel:none", "accel:default", *(ACCEL_PREFIX + change for change in changes))


@dataclass(frozen=True)
class BenchConfig:
    model_dir: Path
    width: int
    height: int
    steps: int
    repeats: int
    rounds: int
    isas: tuple[str, ...]
    variants: tuple[str, ...] = VARIANTS
    prompt: str = PROMPT
    seed: int = 1234
    guidance_scale: float = NAIVE_GUIDANCE
    extra_env: dict[str, str] = field(default_factory=dict)
    # The fast_lcm variant's model: the same weights with an LCM scheduler (see ``lcm_view``).
    lcm_model_dir: Path | None = None
    # Drop the page cache before each process: a cold start, the model and the libraries read from disk.
    cold: bool = False
    # The OpenVINO variants' models: exports of model_dir (see bench_openvino.ensure_export).
    openvino_model_dir: Path | None = None
    openvino_int8_model_dir: Path | None = None

    def model_for(self, variant: str) -> Path:
        folders = {
            "fast_lcm": ("lcm_model_dir", self.lcm_model_dir),
            "openvino": ("openvino_model_dir", self.openvino_model_dir),
            "openvino_fast": ("openvino_model_dir", self.openvino_model_dir),
            "openvino_int8": ("openvino_int8_model_dir", self.openvino_int8_model_dir),
        }
        if variant not in folders:
            return self.model_dir
        name, folder = folders[variant]
        if folder is None:
            raise ValueError(f"the {variant} variant needs {name}")
        return folder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time the project's pipeline against the naive diffusers one (one run, one table)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-dir", type=Path, help="a diffusers folder (default: the sd15 test model, built once)"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where test models are built")
    parser.add_argument("--isa", choices=["native", "avx2", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="256x256, 2 steps, 1 round, no repeats")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512; 256 with --quick)")
    parser.add_argument("--steps", type=int, help="num_inference_steps (default 4; 2 with --quick)")
    parser.add_argument("--repeats", type=int, help="warm images per process after the first (default 1)")
    parser.add_argument("--rounds", type=int, help="processes per variant and ISA, alternating (default 2)")
    parser.add_argument(
        "--variants",
        type=lambda text: tuple(name for name in text.split(",") if name.strip()),
        help=f"comma-separated: {', '.join(NAMED_VARIANTS)}, accel:SEL or {EACH} (default: "
        f"{','.join(VARIANTS)}; with --cold: {','.join(COLD_VARIANTS)}); speed-ups need naive",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help=f"drop the page cache before each process (root: writes {DROP_CACHES})",
    )
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=bench_openvino.DEFAULT_CALIBRATION_SAMPLES,
        help="UNet calls the int8 export's calibration records (openvino_int8)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("bench.json"),
        help="JSON results (default: %(default)s); the plot goes beside it as .png",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sd_lambda.cli import CommandError

    quick = args.quick
    side = args.size or (256 if quick else 512)
    steps = args.steps or (2 if quick else 4)
    repeats = args.repeats if args.repeats is not None else (0 if quick else 1)
    rounds = args.rounds or (1 if quick else 2)
    if side % 8 or side < 64:
        raise CommandError(f"--size must be a multiple of 8 and at least 64, got {side}")
    if steps < 1 or repeats < 0 or rounds < 1 or args.calibration_samples < 1:
        raise CommandError("--steps, --rounds and --calibration-samples must be >= 1 and --repeats >= 0")
    if args.model_dir is not None:
        if not (args.model_dir / "model_index.json").is_file():
            raise CommandError(f"{args.model_dir} is not a diffusers folder (no model_index.json)")
        model_dir = args.model_dir
    else:
        model_dir = ensure_test_model(args.cache / "sd15")
    variants = args.variants if args.variants is not None else (COLD_VARIANTS if args.cold else VARIANTS)
    variants = tuple(
        dict.fromkeys(v for name in variants for v in (each_acceleration() if name == EACH else [name]))
    )
    if not variants:
        raise CommandError("--variants is empty")
    for variant in variants:
        try:
            check_variant(variant)
        except ValueError as exc:
            raise CommandError(f"--variants: {exc}") from None
    if args.cold:
        try:
            drop_page_cache()
        except OSError as exc:
            raise CommandError(f"--cold needs root: cannot write {DROP_CACHES} ({exc.strerror})") from None
    isas = ("native", "avx2") if args.isa == "both" else (args.isa,)
    lcm_dir = lcm_view(model_dir, args.cache / "lcm-views" / model_dir.resolve().name)
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        exports = openvino_exports(model_dir, args.cache, variants, args.calibration_samples, progress)
    except bench_openvino.ExportError as exc:
        raise CommandError(str(exc)) from None
    config = BenchConfig(
        model_dir,
        side,
        side,
        steps,
        repeats,
        rounds,
        isas,
        variants,
        lcm_model_dir=lcm_dir,
        cold=args.cold,
        openvino_model_dir=exports.get(None),
        openvino_int8_model_dir=exports.get("int8"),
    )
    try:
        report = run_bench(config, progress=progress)
    except (WorkerError, bench_openvino.ExportError) as exc:
        raise CommandError(str(exc)) from exc
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    from sd_lambda.devtools.bench_plot import write_plot

    plot = args.output.with_suffix(".png")
    write_plot(report, plot)
    print(format_report(report))
    print(f"\nwrote {args.output} and {plot}")
    return 0


def openvino_exports(
    model_dir: Path, cache: Path, variants: tuple[str, ...], calibration_samples: int, progress
) -> dict[str | None, Path]:
    """The exports the OpenVINO variants among ``variants`` run, by quantisation, each made once (the
    source hashed once for all of them)."""
    wanted = dict.fromkeys(OPENVINO_EXPORTS[v] for v in variants if v in OPENVINO_EXPORTS)
    if not wanted:
        return {}
    source_sha256 = bench_openvino.source_hash(model_dir)
    return {
        quantize: bench_openvino.ensure_export(
            model_dir,
            bench_openvino.export_folder(cache, model_dir, quantize),
            quantize,
            calibration_samples,
            source_sha256=source_sha256,
            progress=progress,
        )
        for quantize in wanted
    }


def ensure_test_model(folder: Path, size: str = "sd15") -> Path:
    """The random-weight test model (sd15: the SD 1.5 architecture, 4.3 GB, half a minute, plus its
    2.1 GB bf16 copy), built once."""
    from sd_lambda.engine.accel.bf16_copy import add_bf16_copy

    if (folder / "model_index.json").is_file():
        if add_bf16_copy(folder):  # a model cached before the bench used copies
            print(f"added a bf16 copy to {folder}", file=sys.stderr, flush=True)
        return folder
    from sd_lambda.devtools.testing.models import build_test_model

    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    print(f"building the {size} test model in {folder} (once)", file=sys.stderr, flush=True)
    build_test_model(staging, size)
    add_bf16_copy(staging)
    staging.rename(folder)
    return folder


def lcm_view(model_dir: Path, folder: Path) -> Path:
    """``model_dir`` with its scheduler swapped for LCMScheduler: every other entry is a symlink to the
    original, so the weights are shared, not copied. Rebuilt on every call (it is cheap); an existing
    ``folder`` is replaced only if it is such a view. The model's own defaults marker is left out, so
    the engine derives the LCM defaults (no classifier-free guidance) as it would for an LCM model."""
    from diffusers import LCMScheduler

    from sd_lambda.cli import CommandError
    from sd_lambda.engine.model_defaults import DEFAULTS_MARKER

    if folder.exists():
        if not (folder / LCM_VIEW_MARKER).is_file():
            raise CommandError(
                f"{folder} exists and is not a bench LCM view; move it or pass another --cache"
            )
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / LCM_VIEW_MARKER).write_text(f"LCM-scheduler view of {model_dir.resolve()}\n")
    for entry in model_dir.resolve().iterdir():
        if entry.name not in ("scheduler", "model_index.json", DEFAULTS_MARKER):
            (folder / entry.name).symlink_to(entry)
    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    LCMScheduler.from_config(config).save_pretrained(folder / "scheduler")
    index = json.loads((model_dir / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def drop_page_cache() -> None:
    """Write dirty pages back, then drop the clean page cache (not dentries and inodes): the next
    process reads the model and the libraries from disk."""
    os.sync()
    DROP_CACHES.write_text("1\n")


class WorkerError(RuntimeError):
    pass


def run_worker(config: BenchConfig, variant: str, isa: str) -> dict[str, Any]:
    spec = {
        "variant": variant,
        "isa": isa,
        "model_dir": str(config.model_for(variant)),
        "prompt": config.prompt,
        "seed": config.seed,
        "steps": config.steps,
        "width": config.width,
        "height": config.height,
        "guidance_scale": config.guidance_scale,
        "repeats": config.repeats,
    }
    env = {**os.environ, **ISA_ENV[isa], **config.extra_env}
    command = [sys.executable, "-m", "sd_lambda.devtools.bench_worker", json.dumps(spec)]
    with tempfile.TemporaryDirectory(prefix="sd-lambda-bench-ov-cache-") as compile_cache:
        if variant in OPENVINO_VARIANTS:
            # Each process starts with an empty compile cache, as a new Lambda environment's /tmp does.
            env.setdefault("SD_OPENVINO_CACHE_DIR", compile_cache)
        completed = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_SECONDS, check=False
        )
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line.removeprefix(RESULT_PREFIX))
    tail = " | ".join(completed.stderr.strip().splitlines()[-5:])
    raise WorkerError(f"{variant} ({isa}) worker exited {completed.returncode} without a result: {tail}")


def run_order(config: BenchConfig) -> list[tuple[int, str, str]]:
    """(round, isa, variant) in run order. Each round starts one variant later, so no variant always
    runs first after the previous ISA's processes (or the model build), where the machine may be in a
    different state (with as many rounds as variants, every variant runs in every position)."""
    order = []
    variants = list(config.variants)
    for round_index in range(config.rounds):
        shift = round_index % len(variants)
        for isa in config.isas:
            order += [(round_index, isa, variant) for variant in variants[shift:] + variants[:shift]]
    return order


def run_bench(config: BenchConfig, progress=lambda line: None) -> dict[str, Any]:
    from sd_lambda.devtools.flops import count_flops

    load_before = os.getloadavg()
    started = time.time()
    flops = count_flops(config.model_dir, config.width, config.height)
    samples: list[dict[str, Any]] = []
    for round_index, isa, variant in run_order(config):
        progress(f"round {round_index + 1}/{config.rounds}: {variant} ({isa}) ...")
        if config.cold:
            drop_page_cache()
        sample = run_worker(config, variant, isa)
        samples.append({"round": round_index, **sample})
        progress(f"  {sample['images'][-1]['seconds']:.2f} s/image, {sample['dtype']}")
    kernels = record_openvino_kernels(config, samples, progress)
    peaks = record_peaks(config, samples, progress)
    flags = cpu.read_cpu_flags()
    summary = summarize(samples, flops.to_dict(), flags, cpu.cpu_ghz() or 0.0, peaks)
    return {
        "config": {
            **asdict(config),
            "model_dir": str(config.model_dir),
            "lcm_model_dir": str(config.lcm_model_dir) if config.lcm_model_dir else None,
            "openvino_model_dir": str(config.openvino_model_dir) if config.openvino_model_dir else None,
            "openvino_int8_model_dir": (
                str(config.openvino_int8_model_dir) if config.openvino_int8_model_dir else None
            ),
        },
        "machine": {
            "cpu_flags": sorted(flags & {"avx2", "avx512f", *cpu.NATIVE_BF16_FLAGS}),
            "ghz": cpu.cpu_ghz(),
            "cpus": cpu.cpu_budget().cpus,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "flops": flops.to_dict(),
        "wall_seconds": time.time() - started,
        "results": summary["results"],
        "ratios": summary["ratios"],
        "targets": summary["targets"],
        "accelerations": summary["accelerations"],
        "kernels": kernels,
        "measured_peak": peaks,
        "samples": samples,
    }


def record_peaks(
    config: BenchConfig, samples: list[dict[str, Any]], progress=lambda line: None
) -> dict[str, dict[str, Any]]:
    """Per ISA: the CPU's measured f32 rate with the workers' threads (bench_peak), after the rounds."""
    peaks = {}
    for isa in config.isas:
        threads = next((s["threads"] for s in samples if s["isa"] == isa), None)
        if threads is None:
            continue
        progress(f"peak: timing f32 kernels ({isa}, {threads} threads) ...")
        try:
            peaks[isa] = bench_peak.record_peak(threads, {**ISA_ENV[isa], **config.extra_env})
        except bench_peak.PeakError as exc:  # an extra: the run's samples are kept, without bounds
            progress(f"peak: {exc}; the targets go without their f32 bounds")
    return peaks


def record_openvino_kernels(
    config: BenchConfig, samples: list[dict[str, Any]], progress=lambda line: None
) -> dict[str, dict[str, Any]]:
    """Per ISA and OpenVINO variant: which kernels ran its UNet at the bench's shape and batch, from a
    profiled inference under the same ISA environment (one per model, ISA and batch: openvino and
    openvino_fast share theirs when both run guided)."""
    recorded: dict[tuple[Path, str, int], dict[str, Any]] = {}
    kernels = {}
    for sample in samples:
        variant, isa = sample["variant"], sample["isa"]
        if variant not in OPENVINO_VARIANTS or f"{isa}/{variant}" in kernels:
            continue
        unet = config.model_for(variant) / bench_openvino.OPENVINO_UNET
        batch = sample["images"][0]["unet_batch"]
        key = (unet, isa, batch)
        if key not in recorded:
            progress(f"kernels: profiling {unet} ({isa}, batch {batch}) ...")
            recorded[key] = bench_openvino.record_kernels(
                unet, config.width, config.height, batch, {**ISA_ENV[isa], **config.extra_env}
            )
        kernels[f"{isa}/{variant}"] = recorded[key]
    return kernels


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def isa_flags(flags: frozenset[str], isa: str) -> frozenset[str]:
    """The flags a capped process can use: under avx2 neither AVX-512 nor native bf16."""
    if isa == "avx2":
        return frozenset(f for f in flags if not f.startswith("avx512") and f not in cpu.NATIVE_BF16_FLAGS)
    return flags


def folded(sample: dict[str, Any]) -> bool:
    """Whether the variant ran the folded upsamplers (the engine's FLOPs) or stock diffusers modules."""
    return "upsample_fold" in sample.get("accelerations", ())


def unet_flops(flops: dict[str, Any], sample: dict[str, Any], engine: bool) -> float:
    suffix = "_engine" if engine else ""
    reused = sample.get("reused_calls", 0)
    full = sample["unet_calls"] - reused
    per_call, per_reused_call = flops["unet" + suffix], flops["unet_reused" + suffix]
    # A guided call with guidance_prefix computes the layers before the first cross-attention once
    # (no upsampler among them: folded or not, the same FLOPs).
    shared = sample.get("prefix_shared_calls", 0) * flops["unet_prefix_engine"]
    return sample["unet_batch"] * (full * per_call + reused * per_reused_call) - shared


def image_flops(flops: dict[str, Any], sample: dict[str, Any], decoder: str, engine: bool) -> float:
    """What the variant computed: ``engine`` with the folded upsamplers, else stock diffusers modules."""
    if decoder == "tiny":
        decode = flops["tiny_decode"]
    else:
        decode = flops["vae_decode_engine" if engine else "vae_decode"]
    return unet_flops(flops, sample, engine) + decode + flops["text_encoder"] * sample["text_encoder_calls"]


def summarize(
    samples: list[dict[str, Any]],
    flops: dict[str, Any],
    flags: frozenset[str],
    ghz: float,
    peaks: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    for sample in samples:
        results.setdefault(f"{sample['isa']}/{sample['variant']}", {"runs": []})["runs"].append(sample)
    for entry in results.values():
        runs = entry.pop("runs")
        first = runs[0]
        warm = [image for run in runs for image in run["images"][1:]] or [run["images"][0] for run in runs]
        seconds = _median([image["seconds"] for image in warm])
        per_call = _median([image["unet_seconds"] / image["unet_calls"] for image in warm])
        engine = folded(first)
        work = _median([image_flops(flops, image, first["decoder"], engine) for image in warm])
        peak = cpu.peak_gflops(isa_flags(flags, first["isa"]), first["threads"], ghz, first["dtype"])
        unet_rates = [unet_flops(flops, image, engine) / image["unet_seconds"] for image in warm]
        unet_gflops = _median(unet_rates) / 1e9
        entry.update(
            isa=first["isa"],
            variant=first["variant"],
            dtype=first["dtype"],
            weights=first.get("weights", "stored"),
            decoder=first["decoder"],
            scheduler=first["scheduler"],
            accelerations=first.get("accelerations"),
            threads=first["threads"],
            cpu_capability=first["cpu_capability"],
            unet_calls=warm[0]["unet_calls"],
            unet_batch=warm[0]["unet_batch"],
            seconds_per_image=seconds,
            cpu_seconds_per_image=_median([image.get("cpu_seconds", float("nan")) for image in warm]),
            seconds_per_unet_call=per_call,
            decode_seconds=_median([image["decode_seconds"] for image in warm]),
            import_seconds=_median([run["import_seconds"] for run in runs]),
            load_seconds=_median([run["load_seconds"] for run in runs]),
            first_image_seconds=_median([run["first_image_seconds"] for run in runs]),
            start_to_image_seconds=_median(
                [run["import_seconds"] + run["load_seconds"] + run["first_image_seconds"] for run in runs]
            ),
            peak_rss_gb=max(run["peak_rss_bytes"] for run in runs) / 1e9,
            # OpenVINO variants: a load that finds its compiled shape in the cache, and whether torch
            # was imported by the end of the load / of the images (the runtime is meant to be torch-free).
            cached_load_seconds=_median([run["cached_load_seconds"] for run in runs])
            if first.get("cached_load_seconds") is not None
            else None,
            torch_after_load=any(run.get("torch_after_load", True) for run in runs),
            torch_after_images=any(run.get("torch_after_images", True) for run in runs),
            image_gflop=work / 1e9,
            gflops_per_second=work / seconds / 1e9,
            unet_gflops_per_second=unet_gflops,
            peak_gflops_per_second=peak,
            measured_peak_gflops_per_second=(peaks or {}).get(first["isa"], {}).get("peak"),
            warm_images=len(warm),
        )
    ratios: dict[str, dict[str, float]] = {}
    targets: dict[str, dict[str, Any]] = {}
    for isa in {entry["isa"] for entry in results.values()}:
        naive = results.get(f"{isa}/naive")
        if naive is None:
            continue
        ratios[isa] = {}
        for other in results.values():
            if other["isa"] == isa and other["variant"] != "naive":
                ratios[isa][f"{other['variant']}_speedup"] = (
                    naive["seconds_per_image"] / other["seconds_per_image"]
                )
        targets[isa] = {}
        if "accel:default_speedup" in ratios[isa]:
            want = TARGETS["accel:default_speedup"][isa]
            targets[isa]["accel:default_speedup"] = _target(
                ratios[isa]["accel:default_speedup"],
                want,
                higher=True,
                bound=_speedup_bound(naive, results[f"{isa}/accel:default"]),
            )
        for fast in ("fast_speedup", "fast_lcm_speedup", "openvino_fast_speedup", "openvino_int8_speedup"):
            if fast in ratios[isa]:
                targets[isa][fast] = _target(
                    ratios[isa][fast],
                    TARGETS["fast_speedup"],
                    higher=True,
                    bound=_speedup_bound(naive, results[f"{isa}/{fast.removesuffix('_speedup')}"]),
                )
    for entry in results.values():
        if entry["variant"] != "naive":
            targets.setdefault(entry["isa"], {})[f"{entry['variant']}_peak_rss_gb"] = _target(
                entry["peak_rss_gb"], TARGET_PEAK_RSS_GB, higher=False
            )
            overhead = entry["import_seconds"] + entry["load_seconds"]
            targets[entry["isa"]][f"{entry['variant']}_import_load_seconds"] = _target(
                overhead,
                TARGET_OPENVINO_IMPORT_LOAD_SECONDS
                if entry["variant"] in OPENVINO_VARIANTS
                else TARGET_IMPORT_LOAD_SECONDS,
                higher=False,
            )
    for entry in results.values():
        counterpart = results.get(f"{entry['isa']}/{TORCH_COUNTERPART.get(entry['variant'])}")
        if counterpart is None:
            continue
        checks = targets[entry["isa"]]
        name = f"{entry['variant']}_peak_rss_gb_vs_{counterpart['variant']}"
        checks[name] = _target(entry["peak_rss_gb"], counterpart["peak_rss_gb"], higher=False)
        if entry["variant"] == "openvino":
            speedup = counterpart["seconds_per_image"] / entry["seconds_per_image"]
            checks[f"openvino_over_{counterpart['variant']}"] = _target(
                speedup, TARGET_OPENVINO_OVER_TORCH, higher=True, bound=_speedup_bound(counterpart, entry)
            )
    return {
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "accelerations": acceleration_gains(samples),
    }


def _per_round(samples: list[dict[str, Any]], isa: str, variant: str) -> list[dict[str, float]]:
    """Each process of one variant: its warm s/image (median), peak RSS (GB), import + load + first image."""
    rounds = []
    for sample in samples:
        if (sample["isa"], sample["variant"]) == (isa, variant):
            warm = sample["images"][1:] or sample["images"]
            rounds.append(
                {
                    "seconds": _median([image["seconds"] for image in warm]),
                    "cpu": _median([image.get("cpu_seconds", float("nan")) for image in warm]),
                    "rss": sample["peak_rss_bytes"] / 1e9,
                    "start": sample["import_seconds"]
                    + sample["load_seconds"]
                    + sample["first_image_seconds"],
                }
            )
    return rounds


def _gain(without: list[dict[str, float]], with_: list[dict[str, float]], key: str) -> tuple[float, float]:
    """(median without - median with, the larger of the two variants' run-to-run ranges)."""
    values = [[run[key] for run in runs] for runs in (without, with_)]
    spread = max(max(v) - min(v) for v in values)
    return _median(values[0]) - _median(values[1]), spread


def acceleration_gains(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ISA and acceleration, from accel:default against accel:-name (a default) or accel:+name (an
    opt-in): what it saves per image and in peak RSS (positive = it helps), with the spread; "pays"
    when either saving is larger than its spread."""
    gains: dict[str, dict[str, Any]] = {}
    for isa in sorted({sample["isa"] for sample in samples}):
        default = _per_round(samples, isa, "accel:default")
        if not default:
            continue
        for sample in samples:
            variant = sample["variant"]
            change = variant.removeprefix(ACCEL_PREFIX)
            if sample["isa"] != isa or not variant.startswith(ACCEL_PREFIX) or change[:1] not in "+-":
                continue
            name = change[1:]
            if not name.isidentifier() or f"{isa}/{name}" in gains:
                continue  # only single changes: accel:-name, accel:+name
            runs = _per_round(samples, isa, variant)
            without, with_ = (runs, default) if change[0] == "-" else (default, runs)
            seconds, seconds_spread = _gain(without, with_, "seconds")
            cpu_seconds, cpu_spread = _gain(without, with_, "cpu")
            rss, rss_spread = _gain(without, with_, "rss")
            start, start_spread = _gain(without, with_, "start")
            gains[f"{isa}/{name}"] = {
                "isa": isa,
                "acceleration": name,
                "variant": variant,
                "rounds": min(len(runs), len(default)),
                "seconds_per_image_saved": seconds,
                "seconds_spread": seconds_spread,
                "cpu_seconds_per_image_saved": cpu_seconds,
                "cpu_seconds_spread": cpu_spread,
                "peak_rss_gb_saved": rss,
                "peak_rss_spread_gb": rss_spread,
                "start_to_image_seconds_saved": start,
                "start_spread": start_spread,
                "pays": seconds > seconds_spread or rss > rss_spread,
            }
    return gains


def _speedup_bound(baseline: dict[str, Any], entry: dict[str, Any]) -> float | None:
    """The most ``entry`` could be faster than ``baseline`` (as measured) if all of its image's FLOPs ran
    at the measured f32 peak; None when it does not compute in f32 (bf16, int8 weights) or nothing was
    measured."""
    peak = entry.get("measured_peak_gflops_per_second")
    if not peak or entry["dtype"] != "float32" or "int8" in str(entry.get("weights")):
        return None
    return baseline["seconds_per_image"] / (entry["image_gflop"] / peak)


def _target(value: float, want: float, higher: bool, bound: float | None = None) -> dict[str, Any]:
    met = value >= want if higher else value <= want
    checked: dict[str, Any] = {"value": round(value, 3), "target": want, "met": met}
    if bound is not None:
        # Beyond the bound the target asks for more than the CPU's f32 arithmetic can give.
        checked["bound_at_measured_peak"] = round(bound, 3)
        checked["reachable_in_f32"] = bound >= want
    return checked


COLUMNS = (
    ("variant", "{isa}/{variant}", 15),
    ("dtype", "{dtype}", 9),
    ("weights", "{weights}", 9),
    ("decoder", "{decoder}", 7),
    ("UNet calls", "{unet_calls}x b{unet_batch}", 10),
    ("s/image", "{seconds_per_image:.2f}", 8),
    ("CPU s/image", "{cpu_seconds_per_image:.1f}", 11),
    ("s/UNet call", "{seconds_per_unet_call:.2f}", 11),
    ("decode s", "{decode_seconds:.2f}", 8),
    ("import s", "{import_seconds:.2f}", 8),
    ("load s", "{load_seconds:.2f}", 7),
    ("1st image s", "{first_image_seconds:.2f}", 11),
    ("start to 1st image s", "{start_to_image_seconds:.2f}", 20),
    ("peak RSS GB", "{peak_rss_gb:.2f}", 11),
    ("GFLOP/s (UNet)", "{gflops_per_second:.0f} ({unet_gflops_per_second:.0f})", 14),
    ("nominal peak", "{peak_gflops_per_second:.0f}", 12),
    ("measured peak", "{measured_peak}", 13),
)


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table (it goes into the README as is), then ratios, targets, FLOPs and load."""
    header = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("-" * (width + 2) for _, _, width in COLUMNS) + "|"
    rows = [header, rule]
    for entry in report["results"].values():
        measured = entry.get("measured_peak_gflops_per_second")
        values = {**entry, "measured_peak": f"{measured:.0f}" if measured else "n/a"}
        rows.append("| " + " | ".join(template.format(**values) for _, template, _ in COLUMNS) + " |")
    lines = ["", *rows, ""]
    for isa, ratios in sorted(report["ratios"].items()):
        text = ", ".join(f"{name.removesuffix('_speedup')} {value:.2f}x" for name, value in ratios.items())
        lines.append(f"speed-up vs naive ({isa}): {text}")
    for isa, checks in sorted(report["targets"].items()):
        for name, check in checks.items():
            verdict = "met" if check["met"] else "MISSED"
            bound = check.get("bound_at_measured_peak")
            ceiling = ""
            if bound is not None:
                beyond = "" if check["reachable_in_f32"] else ": beyond this CPU's f32 arithmetic"
                ceiling = f"; at most {bound:.2f} with every FLOP at the measured peak{beyond}"
            lines.append(
                f"target {isa}/{name}: {check['value']} (target {check['target']}) {verdict}{ceiling}"
            )
    flops = report["flops"]
    tiny = f"{flops['tiny_decode'] / 1e9:.0f}" if flops["tiny_decode"] else "n/a"
    lines.append(
        f"FLOPs at {flops['width']}x{flops['height']} (torch FlopCounterMode, meta device): "
        f"UNet {flops['unet'] / 1e9:.0f} GFLOP per call per batch item "
        f"({flops['unet_reused'] / 1e9:.0f} with deep features reused), VAE decode "
        f"{flops['vae_decode'] / 1e9:.0f}, tiny decode {tiny}, "
        f"text encoder {flops['text_encoder'] / 1e9:.1f}; "
        f"the engine's, upsample convolutions folded: UNet {flops['unet_engine'] / 1e9:.0f} "
        f"({flops['unet_reused_engine'] / 1e9:.0f} reused), VAE decode {flops['vae_decode_engine'] / 1e9:.0f}"
    )
    lines.append(
        "nominal peak = threads x the clock /proc/cpuinfo reports x FLOPs per cycle (2 FMA pipes: 64 "
        "fp32 with AVX-512, 32 with AVX2, 128 bf16); cores that boost above that clock can exceed it"
    )
    for isa, measured in sorted(report.get("measured_peak", {}).items()):
        kernels = ", ".join(f"{name} {rate:.0f}" for name, rate in measured["gflops"].items())
        lines.append(
            f"measured f32 peak ({isa}, {measured['threads']} threads): {measured['peak']:.0f} GFLOP/s, the "
            f"fastest of {kernels} (src/sd_lambda/devtools/bench_peak.py)"
        )
    for name, record in report.get("kernels", {}).items():
        lines.append(format_kernels(name, record))
    if report.get("accelerations"):
        lines += ["", format_gains(report["accelerations"]), ""]
    machine = report["machine"]
    before = ", ".join(f"{x:.2f}" for x in machine["loadavg_before"])
    after = ", ".join(f"{x:.2f}" for x in machine["loadavg_after"])
    lines.append(
        f"machine: {machine['cpus']} CPUs at {machine['ghz']} GHz, flags {', '.join(machine['cpu_flags'])}; "
        f"load average before {before}, after {after}; run took {report['wall_seconds']:.0f} s"
    )
    if report.get("config", {}).get("cold"):
        lines.append(
            "cold: the page cache was dropped before each process, so import, load and the first image "
            "read the libraries and the weights from disk"
        )
    return "\n".join(lines)


def format_kernels(name: str, record: dict[str, Any], layer_types: int = 6) -> str:
    """One line: the UNet's most expensive layer types and the kernels that ran them, by share of time."""
    by_type = record["by_layer_type"]
    total = sum(kernel["ms"] for kernels in by_type.values() for kernel in kernels.values()) or 1.0
    parts = []
    for node_type, kernels in list(by_type.items())[:layer_types]:
        ran = ", ".join(f"{exec_type} {kernel['ms'] / total:.0%}" for exec_type, kernel in kernels.items())
        parts.append(f"{node_type} ({ran})")
    above = ", ".join(record["above_avx2"]) or "none"
    return f"kernels {name} (UNet batch {record['unet_batch']}): {'; '.join(parts)}; above AVX2: {above}"


def format_gains(gains: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: per acceleration, what it saves against the defaults without it (or with it)."""
    from sd_lambda.engine.accel import registry

    rows = [
        "| acceleration | default | variant | s/image saved (spread) | CPU s/image saved (spread) "
        "| peak RSS GB saved (spread) | start to 1st image s saved (spread) | pays |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in gains.values():
        known = registry.BY_NAME.get(entry["acceleration"])
        default = "on" if known is not None and known.default else "opt-in"
        rows.append(
            f"| {entry['isa']}/{entry['acceleration']} | {default} | {entry['variant']} "
            f"| {entry['seconds_per_image_saved']:+.2f} ({entry['seconds_spread']:.2f}) "
            f"| {entry['cpu_seconds_per_image_saved']:+.2f} ({entry['cpu_seconds_spread']:.2f}) "
            f"| {entry['peak_rss_gb_saved']:+.2f} ({entry['peak_rss_spread_gb']:.2f}) "
            f"| {entry['start_to_image_seconds_saved']:+.2f} ({entry['start_spread']:.2f}) "
            f"| {'yes' if entry['pays'] else 'no'} |"
        )
    return "\n".join(rows)
