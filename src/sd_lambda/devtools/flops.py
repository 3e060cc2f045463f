"""FLOPs of one call of each pipeline component, counted by torch on the meta device (no weights).

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions (2 FLOPs per
multiply-add), including attention's batched matmuls; elementwise work (norms, activations) is not
counted, so achieved GFLOP/s derived from these numbers is a slight under-estimate of work done.
The ``*_engine`` counts are what the engine computes: its upsample convolutions are folded
(``sd_lambda.engine.accel.upsample_fold``), the same result from fewer multiply-adds, and a guided
call computes the layers before the first cross-attention once for both halves
(``sd_lambda.engine.accel.guidance_prefix``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from sd_lambda.layout import TINY_DECODER_FOLDER


@dataclass(frozen=True)
class ComponentFlops:
    """FLOPs at one image size: UNet per call per batch item (full, and with deep features reused),
    decoders per image, text encoder per prompt; stock diffusers modules, and the engine's. The
    engine's guided UNet call is ``2 * unet_engine - unet_prefix_engine``."""

    width: int
    height: int
    unet: int
    unet_reused: int
    vae_decode: int
    tiny_decode: int | None
    text_encoder: int
    unet_engine: int
    unet_reused_engine: int
    vae_decode_engine: int
    unet_prefix_engine: int

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


def count_flops(model_dir: Path, width: int, height: int) -> ComponentFlops:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_lambda.engine.accel.feature_reuse import FeatureReuse
    from sd_lambda.engine.accel.guidance_prefix import guidance_prefix
    from sd_lambda.engine.accel.upsample_fold import fold_upsamplers

    def counted(run, module_names: list[str] | None = None) -> int:
        """The FLOPs of ``run()``, or of the named modules in it (named as the counter names them)."""
        with FlopCounterMode(display=False) as counter:
            run()
        if module_names is None:
            return int(counter.get_total_flops())
        per_module = counter.get_flop_counts()
        return sum(sum(per_module.get(name, {}).values()) for name in module_names)

    with torch.device("meta"), torch.inference_mode():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model_dir / "vae"))
        text_config = CLIPTextConfig.from_pretrained(model_dir / "text_encoder")
        text_encoder = CLIPTextModel(text_config)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        latents = torch.zeros(1, unet.config.in_channels, height // scale, width // scale)
        context = torch.zeros(1, text_config.max_position_embeddings, unet.config.cross_attention_dim)
        tokens = torch.zeros(1, text_config.max_position_embeddings, dtype=torch.long)

        def unet_call() -> None:
            unet(latents, torch.tensor([1.0]), encoder_hidden_states=context)

        def unet_calls() -> tuple[int, int]:
            full = counted(unet_call)
            reuse.start(2)
            unet_call()  # full: fills the cache
            reused = counted(unet_call)
            reuse.stop()
            return full, reused

        reuse = FeatureReuse(unet)
        unet_flops, unet_reused_flops = unet_calls()
        vae_flops = counted(lambda: vae.decode(latents))
        fold_upsamplers(unet)
        fold_upsamplers(vae)
        unet_engine_flops, unet_reused_engine_flops = unet_calls()
        names = {module: f"{type(unet).__name__}.{name}" for name, module in unet.named_modules()}
        prefix = [names[layer] for layer in guidance_prefix(unet)]
        unet_prefix_engine_flops = counted(unet_call, prefix)
        vae_engine_flops = counted(lambda: vae.decode(latents))
        text_flops = counted(lambda: text_encoder(tokens))
        tiny_flops = None
        if (model_dir / TINY_DECODER_FOLDER).is_dir():
            tiny = AutoencoderTiny.from_config(AutoencoderTiny.load_config(model_dir / TINY_DECODER_FOLDER))
            tiny_flops = counted(lambda: tiny.decode(latents))
    return ComponentFlops(
        width,
        height,
        unet_flops,
        unet_reused_flops,
        vae_flops,
        tiny_flops,
        text_flops,
        unet_engine_flops,
        unet_reused_engine_flops,
        vae_engine_flops,
        unet_prefix_engine_flops,
    )
