"""The OpenVINO engine: an OpenVINO IR release served by OpenVINO GenAI, with no torch.

The release is optimum-intel's export layout (``sd-lambda seed --export openvino``, or a ready-made
OpenVINO repo): text_encoder/, unet/, vae_decoder/ (and vae_tiny/) as ``openvino_model.xml`` + ``.bin``,
the tokenizer as OpenVINO IR. GenAI's components are compiled for one request shape at a time: static
shapes let the CPU plugin pick its fastest kernels and pre-pack the weights once, where a dynamic UNet
re-plans every call. ``Engine.load`` compiles the default shape (size and guidance) so the first request
at the defaults compiles nothing; another shape is compiled on first use and kept, the oldest dropped
past ``SD_OPENVINO_COMPILED_SIZES``. OpenVINO's model cache (``CACHE_DIR``, in /tmp: the only place
Lambda can write) turns a recompile of a dropped shape into a read of the compiled blob; it is left off
when /tmp cannot hold it (Lambda's /tmp is 512 MB unless ``ephemeral_storage_size`` says more).

The seed is turned into the noise ``torch.Generator`` would draw (sd_lambda.engine.torch_noise, numpy
only: GenAI's own TorchGenerator imports torch), so a request gives the torch engine's image within
float tolerance. Schedulers are
GenAI's: every name the torch engine offers except ``dpmpp_2m`` (GenAI has no DPM-Solver++), and any the
model's config cannot run with GenAI (e.g. DDIM with ``clip_sample``) is left out of ``schedulers``,
so a request for it gets the same 400 as any unknown one.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino
import openvino_genai as genai
from PIL import Image

from sd_lambda.engine import cpu
from sd_lambda.engine.generation import (
    SCHEDULERS,
    GenerationParams,
    GenerationResult,
    resolve_default_decoder,
    resolve_default_scheduler,
)
from sd_lambda.engine.model_defaults import read_json, read_model_defaults, scheduler_class
from sd_lambda.engine.torch_noise import BLOCK, TorchNormal
from sd_lambda.layout import TINY_DECODER_FOLDER, LayoutError, find_pickle_weights
from sd_lambda.settings import Settings

logger = logging.getLogger(__name__)

# Request scheduler name -> GenAI's scheduler type (names as in sd_lambda.engine.generation.SCHEDULERS).
GENAI_SCHEDULERS = {
    "pndm": genai.Scheduler.Type.PNDM,
    "ddim": genai.Scheduler.Type.DDIM,
    "euler": genai.Scheduler.Type.EULER_DISCRETE,
    "euler_a": genai.Scheduler.Type.EULER_ANCESTRAL_DISCRETE,
    "lcm": genai.Scheduler.Type.LCM,
}
# "auto": PNDM (SD 1.x's stock scheduler) spends an extra UNet call warming up; the torch engine swaps
# in DPM-Solver++ 2M, which GenAI lacks, so this engine takes Euler at the same 20 steps.
FALLBACK_SCHEDULER = ("euler", 20)
AUTO_SCHEDULER_REPLACES = {"PNDMScheduler": FALLBACK_SCHEDULER}
# diffusers class -> request name, to tell whether GenAI runs a model's own scheduler.
SCHEDULER_NAMES = {cls: name for name, cls in SCHEDULERS.items()}
DECODER_FOLDERS = {"full": "vae_decoder", "tiny": TINY_DECODER_FOLDER}
# The compiled blobs are about the size of the IR weights; room for this much more is asked before
# OpenVINO writes its cache.
CACHE_HEADROOM = 1.25
DEVICE = "CPU"


@dataclass(frozen=True)
class ShapeKey:
    width: int
    height: int
    guided: bool


@dataclass
class CompiledShape:
    """Text encoder and UNet compiled for one shape, and a pipeline per decoder sharing them."""

    key: ShapeKey
    text_encoder: Any
    unet: Any
    pipelines: dict[str, Any] = field(default_factory=dict)


class OpenVINOEngine:
    """One OpenVINO release, compiled per request shape. One generation at a time."""

    def __init__(
        self,
        model_dir: Path,
        settings: Settings,
        *,
        properties: dict[str, Any],
        precision: tuple[str, str],
        threads: tuple[int, str],
        cache: tuple[str | None, str],
        engine_reason: str,
    ) -> None:
        self.model_dir = model_dir
        self.settings = settings
        self.properties = properties
        self.precision, self.precision_reason = precision
        self.threads, self.threads_reason = threads
        self.cache_dir, self.cache_reason = cache
        self.engine_reason = engine_reason
        self.load_seconds = 0.0
        self.model_scheduler = scheduler_class(model_dir)
        self._scheduler_config = str(model_dir / "scheduler" / "scheduler_config.json")
        self._schedulers, self.unavailable_schedulers = self._probe_schedulers()
        self.default_scheduler, self.scheduler_reason = resolve_default_scheduler(
            settings.default_scheduler, self.model_scheduler, self.schedulers, AUTO_SCHEDULER_REPLACES
        )
        steps = AUTO_SCHEDULER_REPLACES.get(self.model_scheduler, (None, None))[1]
        own = SCHEDULER_NAMES.get(self.model_scheduler)
        if (
            self.default_scheduler is None
            and settings.default_scheduler == "auto"
            and own not in self.schedulers
        ):
            # auto serves what runs: the model's own scheduler would fail every request here.
            self.default_scheduler, steps = FALLBACK_SCHEDULER
            self.scheduler_reason = (
                f"the model's own {self.model_scheduler} does not run on OpenVINO GenAI "
                f"({self._why_not(own)}); {self.default_scheduler} instead"
            )
        if self.default_scheduler is None:
            self._schedulers[None] = self._model_scheduler(own)
        tiny = (model_dir / TINY_DECODER_FOLDER / "openvino_model.xml").is_file()
        self.decoders = ("full", "tiny") if tiny else ("full",)
        self.default_decoder = resolve_default_decoder(settings.default_decoder, tiny, TINY_DECODER_FOLDER)
        # Every decoder's IR is read now, so a damaged one fails the load, not a later request.
        for decoder in self.decoders:
            genai.AutoencoderKL(str(model_dir / DECODER_FOLDERS[decoder]))
        self.defaults = read_model_defaults(model_dir, steps if self.default_scheduler else None)
        self.uses_guidance_embedding = (
            read_json(model_dir / "unet" / "config.json").get("time_cond_proj_dim") is not None
        )
        self._compiled: OrderedDict[ShapeKey, CompiledShape] = OrderedDict()

    @classmethod
    def load(cls, model_dir: Path, settings: Settings | None = None, *, reason: str = "") -> OpenVINOEngine:
        settings = settings or Settings.from_env()
        started = time.perf_counter()
        pickles = find_pickle_weights(model_dir)
        if pickles:
            raise LayoutError(f"refusing pickle weights in {model_dir}: {', '.join(pickles)}")
        threads = cpu.choose_threads(settings)
        precision = choose_precision(settings)
        cache = choose_cache_dir(settings, model_dir)
        properties: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": precision[0],
            "INFERENCE_NUM_THREADS": threads[0],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if cache[0] is not None:
            properties["CACHE_DIR"] = cache[0]
        try:
            engine = cls(
                model_dir,
                settings,
                properties=properties,
                precision=precision,
                threads=threads,
                cache=cache,
                engine_reason=reason or "OpenVINOEngine.load",
            )
            engine._shape(engine._default_key(), engine.default_decoder)
        except (RuntimeError, LayoutError) as exc:  # OpenVINO's word for an IR it cannot read or compile
            raise LayoutError(
                f"cannot load the OpenVINO release {model_dir}: {_openvino_reason(exc)}"
            ) from exc
        engine.load_seconds = time.perf_counter() - started
        engine._log_choices()
        return engine

    # ---- what this engine offers ------------------------------------------------------------------

    @property
    def schedulers(self) -> tuple[str, ...]:
        return tuple(name for name in SCHEDULERS if name in self._schedulers)

    @property
    def features(self) -> frozenset[str]:
        # GenAI's image-to-image and LoRA pipelines are separate compiles of their own: not served here.
        return frozenset()

    @property
    def adapters(self) -> tuple[str, ...]:
        return ()

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "openvino",
            "openvino": openvino.__version__.split("-")[0],
            "dtype": _DTYPE_NAMES[self.precision],
            "threads": self.threads,
            "decoders": list(self.decoders),
            "default_decoder": self.default_decoder,
            "schedulers": list(self.schedulers),
            "unavailable_schedulers": dict(self.unavailable_schedulers),
            "default_scheduler": self.default_scheduler or self.model_scheduler,
            "classifier_free_guidance_default": self.defaults.uses_guidance,
            "features": sorted(self.features),
            "compiled_shapes": [[k.width, k.height, k.guided] for k in self._compiled],
            "compile_cache": self.cache_dir,
            "load_seconds": round(self.load_seconds, 3),
        }

    def _log_choices(self) -> None:
        logger.info("engine openvino: %s", self.engine_reason)
        logger.info("engine threads=%d: %s", self.threads, self.threads_reason)
        logger.info("engine precision=%s: %s", self.precision, self.precision_reason)
        logger.info("engine compile cache=%s: %s", self.cache_dir or "off", self.cache_reason)
        logger.info("engine decoder default=%s, available=%s", self.default_decoder, ",".join(self.decoders))
        logger.info(
            "engine scheduler default=%s: %s; not available: %s",
            self.default_scheduler or "model's own",
            self.scheduler_reason,
            "; ".join(f"{k} ({v})" for k, v in self.unavailable_schedulers.items()) or "none",
        )
        logger.info(
            "engine defaults: %s (classifier-free guidance %s)",
            self.defaults,
            "on" if self.defaults.uses_guidance else "off",
        )
        if self.settings.accelerations:
            logger.info("engine SD_ACCEL=%s: torch accelerations, not used by OpenVINO", self.settings.accel)
        logger.info("engine load %.2fs (default shape compiled)", self.load_seconds)

    # ---- schedulers ---------------------------------------------------------------------------------

    def _probe_schedulers(self) -> tuple[dict[str | None, Any], dict[str, str]]:
        """The schedulers GenAI can build from this model's config, and why each other one is missing."""
        available: dict[str | None, Any] = {}
        missing: dict[str, str] = {}
        config = read_json(Path(self._scheduler_config))
        for name in SCHEDULERS:
            kind = GENAI_SCHEDULERS.get(name)
            if kind is None:
                missing[name] = "OpenVINO GenAI has no such scheduler"
                continue
            if name == "ddim" and config.get("clip_sample", True):
                # diffusers' DDIM clips the predicted sample unless the config says not to (its default);
                # GenAI's DDIM refuses clip_sample when it generates, not when it is built.
                missing[name] = "the model's scheduler config asks DDIM for clip_sample, which GenAI lacks"
                continue
            try:
                available[name] = genai.Scheduler.from_config(self._scheduler_config, kind)
            except RuntimeError as exc:
                missing[name] = _openvino_reason(exc)
        return available, missing

    def _why_not(self, own: str | None) -> str:
        if own is None:
            return "not a scheduler the request offers"
        return self.unavailable_schedulers.get(own, "OpenVINO GenAI has no such scheduler")

    def _model_scheduler(self, own: str | None) -> Any:
        """The model's own scheduler (SD_DEFAULT_SCHEDULER=model); a ValueError when GenAI cannot run it."""
        if own in self.unavailable_schedulers:
            reason = self.unavailable_schedulers[own]
        else:
            try:
                return genai.Scheduler.from_config(self._scheduler_config)
            except RuntimeError as exc:
                reason = _openvino_reason(exc)
        raise ValueError(
            f"the model's own {self.model_scheduler} does not run on OpenVINO GenAI ({reason}): set "
            f"SD_DEFAULT_SCHEDULER to auto or to one of {', '.join(self.schedulers)}"
        )

    # ---- compiled shapes ----------------------------------------------------------------------------

    def _default_key(self) -> ShapeKey:
        d = self.defaults
        return ShapeKey(d.width, d.height, self._guided(d.guidance_scale))

    def _guided(self, guidance_scale: float) -> bool:
        return guidance_scale > 1 and not self.uses_guidance_embedding

    def _shape(self, key: ShapeKey, decoder: str) -> tuple[Any, bool]:
        """The pipeline for ``key`` and ``decoder``, compiling what is missing; and whether it compiled.

        A new shape reads the release's IR again (GenAI compiles from files): a release pruned or damaged
        since the load is a LayoutError (a 503 ``model_incomplete``), as at load."""
        try:
            return self._compile_shape(key, decoder)
        except RuntimeError as exc:
            raise LayoutError(
                f"cannot compile {key.width}x{key.height} from {self.model_dir}: {_openvino_reason(exc)}"
            ) from exc

    def _compile_shape(self, key: ShapeKey, decoder: str) -> tuple[Any, bool]:
        compiled = self._compiled.get(key)
        built = False
        if compiled is None:
            while len(self._compiled) >= self.settings.openvino_compiled_sizes:
                self._compiled.popitem(last=False)  # freed before the next compile needs the memory
            batch = 2 if key.guided else 1
            text_encoder = genai.CLIPTextModel(str(self.model_dir / "text_encoder"))
            text_encoder.reshape(batch)
            max_length = text_encoder.get_config().max_position_embeddings
            unet = genai.UNet2DConditionModel(str(self.model_dir / "unet"))
            unet.reshape(batch, key.height, key.width, max_length)
            text_encoder.compile(DEVICE, **self.properties)
            unet.compile(DEVICE, **self.properties)
            compiled = self._compiled[key] = CompiledShape(key, text_encoder, unet)
            built = True
        self._compiled.move_to_end(key)
        pipeline = compiled.pipelines.get(decoder)
        if pipeline is None:
            vae = genai.AutoencoderKL(str(self.model_dir / DECODER_FOLDERS[decoder]))
            vae.reshape(1, key.height, key.width)
            vae.compile(DEVICE, **self.properties)
            scheduler = self._schedulers[self.default_scheduler]
            pipeline = genai.Text2ImagePipeline.stable_diffusion(
                scheduler, compiled.text_encoder, compiled.unet, vae
            )
            compiled.pipelines[decoder] = pipeline
            built = True
        return pipeline, built

    # ---- generating ---------------------------------------------------------------------------------

    def generate(self, params: GenerationParams) -> GenerationResult:
        started = time.perf_counter()
        decoder = params.decoder or self.default_decoder
        if decoder not in self.decoders:
            raise ValueError(f"decoder {decoder!r} is not available; available: {', '.join(self.decoders)}")
        name = params.scheduler or self.default_scheduler
        if name is not None and name not in self.schedulers:
            raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(self.schedulers)}")
        if params.init_image is not None or params.loras:
            raise ValueError("the OpenVINO engine serves text-to-image without LoRA adapters only")
        guided = self._guided(params.guidance_scale)
        pipeline, compiled = self._shape(ShapeKey(params.width, params.height, guided), decoder)
        pipeline.set_scheduler(self._schedulers[name])
        ready = time.perf_counter()
        options: dict[str, Any] = {}
        if params.negative_prompt and guided:
            options["negative_prompt"] = params.negative_prompt
        images: list[Image.Image] = []
        text_encoder_ms = unet_ms = decode_ms = denoise_ms = postprocess_ms = 0.0
        unet_calls = 0
        # One image after another, image i seeded seed + i: the UNet is compiled for one image's batch.
        for seed in params.seeds:
            image_started = time.perf_counter()
            tensor = pipeline.generate(
                params.prompt,
                width=params.width,
                height=params.height,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=SeededGenerator(seed),
                **options,
            )
            generated = time.perf_counter()
            images.append(Image.fromarray(np.asarray(tensor.data)[0]))
            metrics = pipeline.get_performance_metrics()
            unet_us = list(metrics.raw_metrics.unet_inference_durations)
            text_encoder_ms += sum(metrics.get_text_encoder_infer_duration().values())
            unet_ms += sum(unet_us) / 1000
            unet_calls += len(unet_us)
            decode_ms += metrics.get_vae_decoder_infer_duration()
            denoise_ms += (generated - image_started) * 1000
            postprocess_ms += (time.perf_counter() - generated) * 1000
        finished = time.perf_counter()
        timings = {
            "compile": (ready - started) * 1000,
            "text_encoder": text_encoder_ms,
            "unet": unet_ms,
            "decode": decode_ms,
            "denoise": denoise_ms,
            "postprocess": postprocess_ms,
            "inference": (finished - started) * 1000,
        }
        stats = {
            "engine": "openvino",
            "images": len(images),
            "unet_calls": unet_calls,
            "unet_batch": 2 if guided else 1,
            "guided": guided,
            "compiled": compiled,
            # diffusers' class names, as the torch engine reports them
            "scheduler": self.model_scheduler if name is None else SCHEDULERS[name],
            "decoder": decoder,
            "dtype": _DTYPE_NAMES[self.precision],
        }
        return GenerationResult(images, timings, stats)


_DTYPE_NAMES = {"f32": "float32", "bf16": "bfloat16"}


class SeededGenerator(genai.Generator):
    """GenAI's random source, drawing what torch.randn would for the seed (GenAI's generator interface)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._normal = TorchNormal(seed)

    def next(self) -> float:
        # One number: not asked for by the Stable Diffusion pipeline; deterministic, not torch's.
        return float(self._normal.randn((BLOCK,))[0])

    def randn_tensor(self, shape: Any) -> openvino.Tensor:
        return openvino.Tensor(self._normal.randn(tuple(shape)))

    def seed(self, new_seed: int) -> None:
        self._normal = TorchNormal(new_seed)


def choose_precision(settings: Settings, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """OpenVINO's inference precision, by the same rule as the torch engine's dtype."""
    if settings.dtype == "float32":
        return "f32", "SD_DTYPE=float32"
    if settings.dtype == "bfloat16":
        return "bf16", "SD_DTYPE=bfloat16"
    flags = cpu.read_cpu_flags() if flags is None else flags
    if cpu.has_native_bf16(flags):
        return "bf16", f"native bf16 ({', '.join(sorted(flags & cpu.NATIVE_BF16_FLAGS))})"
    # OpenVINO would pick bf16 itself on such CPUs only; saying f32 keeps the choice visible and equal.
    return "f32", "no native bf16: emulated bf16 is slower than f32"


def choose_cache_dir(settings: Settings, model_dir: Path) -> tuple[str | None, str]:
    """OpenVINO's compiled-model cache folder, or None when off or when its disk cannot hold it."""
    if settings.openvino_cache_dir.lower() == "none":
        return None, "SD_OPENVINO_CACHE_DIR=none"
    folder = Path(settings.openvino_cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return None, f"{folder} is not writable ({exc.strerror or exc})"
    needed = int(sum(p.stat().st_size for p in model_dir.glob("*/openvino_model.bin")) * CACHE_HEADROOM)
    if free < needed:
        return None, (
            f"{folder} has {free // 2**20} MB free, compiled models need ~{needed // 2**20} MB "
            "(on Lambda: raise ephemeral_storage_size)"
        )
    return str(folder), f"SD_OPENVINO_CACHE_DIR ({free // 2**20} MB free)"


def _openvino_reason(exc: BaseException) -> str:
    """The reason in an OpenVINO error: its last non-empty line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # OpenVINO's messages start with the source location of the check; the reason is the last line.
    return lines[-1] if lines else type(exc).__name__
