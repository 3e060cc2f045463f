"""The text-to-image engine: load a diffusers folder once, generate many images.

The handler owns HTTP and validation; this module owns torch. ``Engine.load`` does every piece of
work that does not depend on a request (threads, dtype, the accelerations ``SD_ACCEL`` selects,
decoders, scheduler instances, the empty negative prompt's embedding), logs each choice once, and
leaves ``Engine.generate`` as short as it can be. The accelerations are applied in the registry's order
(sd_lambda.engine.accel.registry); each one that does not apply to the loaded model, or is not tested
on the installed diffusers, is skipped and logged, and that part runs stock diffusers.

Request defaults come from the model's config files (sd_lambda.engine.model_defaults), as for every engine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from sd_lambda.engine import cpu
from sd_lambda.engine.accel import registry
from sd_lambda.engine.generation import (
    DECODERS,
    DEFAULT_STRENGTH,
    SCHEDULERS,
    GenerationParams,
    GenerationResult,
    resolve_default_decoder,
    resolve_default_scheduler,
)
from sd_lambda.engine.lora import Adapters
from sd_lambda.engine.model_defaults import read_model_defaults
from sd_lambda.layout import (
    BF16_VARIANT,
    TINY_DECODER_FOLDER,
    LayoutError,
    ModelPaths,
    find_pickle_weights,
)
from sd_lambda.settings import Settings

logger = logging.getLogger(__name__)

# PNDM (SD 1.x's stock scheduler) spends an extra UNet call warming up; DPM-Solver++ 2M reaches the same
# quality in fewer steps, so "auto" swaps it in for PNDM models and keeps every other model's own.
AUTO_SCHEDULER_REPLACES = {"PNDMScheduler": ("dpmpp_2m", 20)}


@dataclass(frozen=True)
class RuntimeChoices:
    """What ``Engine.load`` decided, and why (``describe()`` and the load log show these)."""

    threads: int
    threads_reason: str
    dtype: torch.dtype
    dtype_reason: str
    default_decoder: str
    default_scheduler: str | None
    scheduler_reason: str
    # Which files were mapped: the model's stored weights (cast at load when dtype differs) or its
    # bf16 copy (sd_lambda.engine.accel.bf16_copy), mapped as stored.
    weights: str = "stored"
    # name -> what it did, in the order applied; name -> why it was not (selected by SD_ACCEL but skipped).
    accelerations: dict[str, str] = field(default_factory=dict)
    skipped_accelerations: dict[str, str] = field(default_factory=dict)


class UnetRecorder:
    """Counts UNet calls, their batch size and their time, via forward hooks (no pipeline changes)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls, self.batch, self.seconds, self._started = 0, 0, 0.0, 0.0
        unet.register_forward_pre_hook(self._before)
        unet.register_forward_hook(self._after)

    def reset(self) -> None:
        self.calls, self.batch, self.seconds = 0, 0, 0.0

    def _before(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._started = time.perf_counter()
        self.batch = int(args[0].shape[0])

    def _after(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.calls += 1
        self.seconds += time.perf_counter() - self._started


def choose_dtype(settings: Settings, flags: frozenset[str] | None = None) -> tuple[torch.dtype, str]:
    if settings.dtype == "float32":
        return torch.float32, "SD_DTYPE=float32"
    if settings.dtype == "bfloat16":
        return torch.bfloat16, "SD_DTYPE=bfloat16"
    if settings.dtype != "auto":
        raise ValueError(f"SD_DTYPE={settings.dtype!r} is not one of auto, float32, bfloat16")
    flags = cpu.read_cpu_flags() if flags is None else flags
    capability = torch.backends.cpu.get_cpu_capability()
    if cpu.has_native_bf16(flags) and capability.startswith("AVX512"):
        return torch.bfloat16, f"native bf16 ({', '.join(sorted(flags & cpu.NATIVE_BF16_FLAGS))})"
    return torch.float32, f"no native bf16 (ATen {capability}): emulated bf16 is slower than fp32"


class Engine:
    """One loaded pipeline. Not thread-safe: one generation at a time, like one Lambda environment."""

    def __init__(
        self,
        pipeline: Any,
        model_dir: Path,
        load_seconds: float,
        *,
        tiny_decoder: Any | None = None,
        choices: RuntimeChoices | None = None,
        settings: Settings | None = None,
        accel_state: dict[str, Any] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.model_dir = model_dir
        self.load_seconds = load_seconds
        self.settings = settings or Settings()
        self.tiny_decoder = tiny_decoder
        self.engine_reason = "as constructed"
        self.choices = choices or RuntimeChoices(
            threads=torch.get_num_threads(),
            threads_reason="as found",
            dtype=pipeline.unet.dtype,
            dtype_reason="as loaded",
            default_decoder="full",
            default_scheduler=None,
            scheduler_reason="model's own",
        )
        self._schedulers = {"model": pipeline.scheduler}
        steps = None
        if self.choices.default_scheduler is not None:
            self._scheduler(self.choices.default_scheduler)  # built once, here, not on a request
            steps = AUTO_SCHEDULER_REPLACES.get(type(pipeline.scheduler).__name__, (None, None))[1]
        self.defaults = read_model_defaults(model_dir, steps)
        self._unet_recorder = UnetRecorder(pipeline.unet)
        self.img2img = _image_to_image_pipeline(pipeline)
        # Accelerations with per-generation state (start() before, stop() after each generation).
        self._accel_state = accel_state or {}
        with torch.inference_mode():
            self._empty_prompt_embeds = self._encode("")
        # The model's LoRA adapters (<model>/loras/ beside its releases), loaded when a request names one.
        self.loras = Adapters(pipeline, ModelPaths(self.settings.model_dir))

    @classmethod
    def load(cls, model_dir: Path, settings: Settings | None = None, *, reason: str = "") -> Engine:
        import diffusers
        from diffusers import AutoencoderTiny, StableDiffusionPipeline

        settings = settings or Settings.from_env()
        started = time.perf_counter()
        pickles = find_pickle_weights(model_dir)
        if pickles:
            raise LayoutError(f"refusing pickle weights in {model_dir}: {', '.join(pickles)}")
        threads, threads_reason = cpu.choose_threads(settings)
        torch.set_num_threads(threads)
        dtype, dtype_reason = choose_dtype(settings)
        target = registry.Target(model_dir, dtype, frozenset(settings.accelerations))
        applied, skipped = {}, {}

        def apply_stage(stage: str) -> None:
            for name in settings.accelerations:
                acceleration = registry.BY_NAME[name]
                if acceleration.stage != stage:
                    continue
                if not registry.tested_on(acceleration, diffusers.__version__):
                    skipped[name] = (
                        f"tested on diffusers {acceleration.diffusers}, not {diffusers.__version__}"
                    )
                elif (reason := acceleration.check(target)) is not None:
                    skipped[name] = reason
                else:
                    applied[name] = acceleration.apply(target)

        apply_stage("init")
        apply_stage("load")
        _quiet_progress_bars()
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                model_dir,
                use_safetensors=True,
                safety_checker=None,
                requires_safety_checker=False,
                low_cpu_mem_usage=True,
                **target.load_options,
            )
            tiny_decoder = None
            if (model_dir / TINY_DECODER_FOLDER).is_dir():
                tiny_decoder = AutoencoderTiny.from_pretrained(
                    model_dir / TINY_DECODER_FOLDER, use_safetensors=True
                ).eval()
        except SafetensorError as exc:  # a truncated or corrupt weights file: an incomplete seed
            raise LayoutError(f"unreadable weights in {model_dir} ({type(exc).__name__}: {exc})") from exc
        pipeline.set_progress_bar_config(disable=True)
        target.pipeline, target.tiny_decoder = pipeline, tiny_decoder
        apply_stage("pipeline")
        # Whatever no acceleration cast yet (all of it with SD_ACCEL=none): stock torch casts, no-ops
        # for what is already in the runtime dtype.
        for component in (pipeline.text_encoder, pipeline.unet, pipeline.vae, tiny_decoder):
            if component is not None and component.dtype != dtype:
                component.to(dtype)
        default_decoder = resolve_default_decoder(
            settings.default_decoder, tiny_decoder is not None, TINY_DECODER_FOLDER
        )
        default_scheduler, scheduler_reason = resolve_default_scheduler(
            settings.default_scheduler, type(pipeline.scheduler).__name__, SCHEDULERS, AUTO_SCHEDULER_REPLACES
        )
        choices = RuntimeChoices(
            threads=threads,
            threads_reason=threads_reason,
            dtype=dtype,
            dtype_reason=dtype_reason,
            default_decoder=default_decoder,
            default_scheduler=default_scheduler,
            scheduler_reason=scheduler_reason,
            weights=f"{BF16_VARIANT} copy" if "bf16_copy" in applied else "stored",
            accelerations=applied,
            skipped_accelerations=skipped,
        )
        engine = cls(
            pipeline,
            model_dir,
            0.0,
            tiny_decoder=tiny_decoder,
            choices=choices,
            settings=settings,
            accel_state=target.state,
        )
        engine.load_seconds = time.perf_counter() - started
        engine.engine_reason = reason or "Engine.load"
        engine._log_choices()
        return engine

    def _log_choices(self) -> None:
        c = self.choices
        logger.info("engine torch: %s", self.engine_reason)
        logger.info("engine threads=%d: %s", c.threads, c.threads_reason)
        logger.info(
            "engine dtype=%s: %s; weights: %s", str(c.dtype).removeprefix("torch."), c.dtype_reason, c.weights
        )
        logger.info("engine decoder default=%s, available=%s", c.default_decoder, ",".join(self.decoders))
        scheduler = c.default_scheduler or "model's own"
        logger.info("engine scheduler default=%s: %s", scheduler, c.scheduler_reason)
        logger.info(
            "engine defaults: %s (classifier-free guidance %s)",
            self.defaults,
            "on" if self.defaults.uses_guidance else "off",
        )
        for name, detail in c.accelerations.items():
            logger.info("engine acceleration %s: %s", name, detail)
        for name, reason in c.skipped_accelerations.items():
            logger.info("engine acceleration %s skipped: %s", name, reason)
        logger.info(
            "engine accelerations: %s (SD_ACCEL=%s); load %.2fs",
            ", ".join(c.accelerations) or "none, stock diffusers",
            self.settings.accel,
            self.load_seconds,
        )

    @property
    def schedulers(self) -> tuple[str, ...]:
        return tuple(SCHEDULERS)

    @property
    def decoders(self) -> tuple[str, ...]:
        return DECODERS if self.tiny_decoder is not None else ("full",)

    @property
    def features(self) -> frozenset[str]:
        features = set() if self._no_init_image_reason else {"init_image"}
        return frozenset(features | ({"loras"} if self.loras.available else set()))

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.loras.names()

    @property
    def _no_init_image_reason(self) -> str | None:
        if getattr(self.pipeline.vae, "encoder", None) is None:
            return "the VAE's encoder was freed at load (SD_ACCEL selects vae_encoder_drop)"
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "torch",
            "dtype": str(self.pipeline.unet.dtype).removeprefix("torch."),
            "weights": self.choices.weights,
            "threads": torch.get_num_threads(),
            "decoders": list(self.decoders),
            "default_decoder": self.choices.default_decoder,
            "schedulers": list(self.schedulers),
            "default_scheduler": self.choices.default_scheduler or type(self.pipeline.scheduler).__name__,
            "classifier_free_guidance_default": self.defaults.uses_guidance,
            "features": sorted(self.features),
            **({"unavailable_features": {"init_image": why}} if (why := self._no_init_image_reason) else {}),
            "loras": self.loras.describe(),
            "accelerations": list(self.choices.accelerations),
            "skipped_accelerations": dict(self.choices.skipped_accelerations),
            "load_seconds": round(self.load_seconds, 3),
        }

    def _scheduler(self, name: str | None) -> Any:
        name = name or self.choices.default_scheduler
        if name is None:
            return self._schedulers["model"]
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(SCHEDULERS)}")
        if name not in self._schedulers:
            import diffusers

            scheduler_class = getattr(diffusers, SCHEDULERS[name])
            self._schedulers[name] = scheduler_class.from_config(self._schedulers["model"].config)
        return self._schedulers[name]

    def _encode(self, text: str) -> torch.Tensor:
        embeds, _ = self.pipeline.encode_prompt(
            text, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds

    def _decode(self, latents: torch.Tensor, decoder: str) -> torch.Tensor:
        model = self.tiny_decoder if decoder == "tiny" else self.pipeline.vae
        if model is None:
            raise ValueError(f"decoder {decoder!r} is not available; available: {', '.join(self.decoders)}")
        scaled = latents / model.config.scaling_factor
        if "channels_last" in self.choices.accelerations:
            scaled = scaled.to(memory_format=torch.channels_last)
        return model.decode(scaled, return_dict=False)[0]

    @torch.inference_mode()
    def generate(self, params: GenerationParams) -> GenerationResult:
        started = time.perf_counter()
        decoder = params.decoder or self.choices.default_decoder
        if decoder not in self.decoders:
            raise ValueError(f"decoder {decoder!r} is not available; available: {', '.join(self.decoders)}")
        if params.init_image is not None and "init_image" not in self.features:
            raise ValueError(f"init_image is not available: {self._no_init_image_reason}")
        pipeline = self.pipeline if params.init_image is None else self.img2img
        pipeline.scheduler = self._scheduler(params.scheduler)
        self.loras.activate(params.loras)  # before encoding: an adapter may change the text encoder
        guided = params.guidance_scale > 1 and pipeline.unet.config.time_cond_proj_dim is None
        prompt_embeds = self._encode(params.prompt)
        negative_embeds = None
        if guided:
            negative_embeds = (
                self._encode(params.negative_prompt or "")
                if params.negative_prompt or self.loras.text_encoder_active
                else self._empty_prompt_embeds
            )
        encoded = time.perf_counter()
        self._unet_recorder.reset()
        for state in self._accel_state.values():
            state.start()
        # One generator per image, seeded seed + i: image i is what a one-image request with seed + i
        # gives (diffusers draws each image's noise from its own generator).
        generators = [torch.Generator().manual_seed(seed) for seed in params.seeds]
        common = {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_embeds,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": params.num_images,
            "generator": generators,
            "output_type": "latent",
        }
        try:
            if params.init_image is None:
                latents = pipeline(**common, width=params.width, height=params.height).images
            else:
                latents = self._image_to_image(params, common)
        finally:
            for state in self._accel_state.values():
                state.stop()
        denoised = time.perf_counter()
        # One image at a time: the decoder's peak memory is per image, and batching it saves nothing.
        pixels = [self._decode(latents[i : i + 1], decoder) for i in range(latents.shape[0])]
        decoded = time.perf_counter()
        images = [pipeline.image_processor.postprocess(p.float(), output_type="pil")[0] for p in pixels]
        finished = time.perf_counter()
        recorder = self._unet_recorder
        timings = {
            "text_encoder": (encoded - started) * 1000,
            "denoise": (denoised - encoded) * 1000,
            "unet": recorder.seconds * 1000,
            "decode": (decoded - denoised) * 1000,
            "postprocess": (finished - decoded) * 1000,
            "inference": (finished - started) * 1000,
        }
        stats = {
            "engine": "torch",
            "unet_calls": recorder.calls,
            "unet_batch": recorder.batch,
            "reused_calls": getattr(self._accel_state.get("feature_reuse"), "reused_calls", 0),
            "prefix_shared_calls": getattr(self._accel_state.get("guidance_prefix"), "shared_calls", 0),
            "guided": guided,
            "scheduler": type(pipeline.scheduler).__name__,
            "decoder": decoder,
            "dtype": str(pipeline.unet.dtype).removeprefix("torch."),
            "images": len(images),
            "image_to_image": params.init_image is not None,
        }
        return GenerationResult(images, timings, stats)

    def _image_to_image(self, params: GenerationParams, common: dict[str, Any]) -> torch.Tensor:
        """Latents for an init_image request. A strength too small for one step (strength x steps < 1)
        runs no UNet call: the start image's own latents (diffusers would fail on an empty schedule)."""
        strength = DEFAULT_STRENGTH if params.strength is None else params.strength
        if int(params.num_inference_steps * strength) == 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
                retrieve_latents,
            )

            vae = self.img2img.vae
            pixels = self.img2img.image_processor.preprocess(params.init_image).to(vae.dtype)
            encoded = [retrieve_latents(vae.encode(pixels), generator=g) for g in common["generator"]]
            return torch.cat(encoded) * vae.config.scaling_factor
        return self.img2img(**common, image=params.init_image, strength=strength).images


def _image_to_image_pipeline(pipeline: Any) -> Any:
    """diffusers' image-to-image pipeline over the loaded pipeline's own modules (no weights copied)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipeline.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def _quiet_progress_bars() -> None:
    """The function's log is JSON lines: no tqdm bars from diffusers' or transformers' loading."""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    huggingface_hub.utils.disable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
