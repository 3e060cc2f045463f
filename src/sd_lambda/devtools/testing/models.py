"""Random-weight Stable Diffusion pipelines with the real architectures, built offline.

``tiny`` is about a megabyte and builds in well under two seconds (tests, demo); ``sd15`` is the exact
Stable Diffusion 1.5 architecture (860M UNet, 83M VAE, 123M CLIP ViT-L/14 text encoder), so it costs
the same compute as the real model (benchmarks). Weights are deterministic from a seed and written as
safetensors in the standard diffusers layout; ``vae_tiny/`` optionally holds a TAESD-style
``AutoencoderTiny`` decoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sd_lambda.layout import TINY_DECODER_FOLDER

if TYPE_CHECKING:
    import torch

# torch, diffusers and transformers load only when a model is built: `sd-lambda --help` and the operator
# commands import this module's command but must not pay for (or need) torch.
Size = Literal["tiny", "sd15"]
TOKENIZER_MAX_LENGTH = 77

# Stable Diffusion 1.5's scheduler configuration (PNDM, scaled-linear betas).
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class ModelSpec:
    """Component configurations of one test-model size."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    tiny_decoder: dict[str, Any]


SPECS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        unet={
            "sample_size": 8,
            "block_out_channels": (8, 16),
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 16,
            "attention_head_dim": 2,
        },
        vae={
            # Four blocks, like SD: the latent is 1/8 of the image, so the tiny decoder fits it.
            "sample_size": 64,
            "block_out_channels": (4, 4, 8, 8),
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "latent_channels": 4,
        },
        text_encoder={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 16,
        },
        tiny_decoder={
            "encoder_block_out_channels": (4, 4, 4, 4),
            "decoder_block_out_channels": (4, 4, 4, 4),
            "num_encoder_blocks": (1, 1, 1, 1),
            "num_decoder_blocks": (1, 1, 1, 1),
        },
    ),
    "sd15": ModelSpec(
        unet={
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        vae={
            "sample_size": 512,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "latent_channels": 4,
        },
        text_encoder={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "vocab_size": 49408,
        },
        tiny_decoder={},  # TAESD's own defaults
    ),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character map (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def write_tokenizer(folder: Path) -> None:
    """A byte-level CLIP tokenizer: every byte is a token, no merges, padded to 77 like SD's."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = sorted(_bytes_to_unicode().values())
    tokens = symbols + [f"{s}</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TOKENIZER_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _components(spec: ModelSpec, seed: int) -> dict[str, torch.nn.Module]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # One seed per component: adding or resizing one never changes the others' weights.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec.vae)
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=2,
        **{"vocab_size": 1000, **spec.text_encoder},
    )
    text_encoder = CLIPTextModel(text_config)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def _tiny_decoder(spec: ModelSpec, seed: int) -> torch.nn.Module:
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed + 3)
    return AutoencoderTiny(**spec.tiny_decoder)


def build_test_model(out_dir: Path, size: Size = "tiny", *, seed: int = 0, tiny_decoder: bool = True) -> Path:
    """Write a random-weight ``StableDiffusionPipeline`` to ``out_dir``; returns ``out_dir``."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    spec = SPECS[size]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out_dir / "tokenizer")
    components = _components(spec, seed)
    pipeline = StableDiffusionPipeline(
        **components,
        tokenizer=CLIPTokenizer.from_pretrained(out_dir / "tokenizer"),
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    _name_text_encoder_weights_as_the_hub_does(out_dir / "text_encoder")
    if tiny_decoder:
        _tiny_decoder(spec, seed).save_pretrained(out_dir / TINY_DECODER_FOLDER, safe_serialization=True)
    return out_dir


def _name_text_encoder_weights_as_the_hub_does(folder: Path) -> None:
    """Name the text encoder's tensors ``text_model.*``, as SD checkpoints on the hub do. The installed
    transformers saves them without that prefix and reads both; the export venv's older transformers
    (optimum-intel caps it) reads only the prefixed names, and would export a randomly initialised
    text encoder from the unprefixed ones (the exporter refuses that; see seeding.openvino_export)."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        renamed = {
            name if name.startswith("text_model.") else f"text_model.{name}": t for name, t in tensors.items()
        }
        save_file(renamed, path, metadata={"format": "pt"})


def parameter_counts(size: Size = "sd15") -> dict[str, int]:
    """Parameters per component, counted on the meta device: no weights are allocated."""
    import torch

    spec = SPECS[size]
    with torch.device("meta"):
        modules = {**_components(spec, seed=0), "vae_tiny": _tiny_decoder(spec, seed=0)}
    return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}


# The modules a test LoRA targets: every attention projection, as diffusers' LoRA training does.
LORA_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def build_test_lora(
    out_dir: Path,
    model_dir: Path,
    *,
    seed: int = 0,
    rank: int = 2,
    upsamplers: bool = False,
    text_encoder: bool = False,
    weights_name: str = "pytorch_lora_weights.safetensors",
) -> Path:
    """Write a random LoRA for the UNet of the model in ``model_dir`` to ``out_dir/weights_name``, in
    diffusers' format. Both halves are random (PEFT's ``init_lora_weights=False``), so unlike a freshly
    initialised adapter (lora_B zero) it changes the image. ``upsamplers``: also the UNet upsamplers'
    convolutions (as LoCon-style adapters train them); ``text_encoder``: also the text encoder's
    attention."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", use_safetensors=True)
    targets = list(LORA_ATTENTION_TARGETS)
    if upsamplers:
        targets += [name for name, _ in unet.named_modules() if name.endswith("upsamplers.0.conv")]
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    if text_encoder:
        encoder = CLIPTextModel.from_pretrained(Path(model_dir) / "text_encoder", use_safetensors=True)
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=list(LORA_TEXT_ENCODER_TARGETS), init_lora_weights=False
        )
        # PEFT's own injection: transformers' add_adapter asks for a newer peft than diffusers does.
        inject_adapter_in_model(config, encoder)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(encoder)
    out_dir = Path(out_dir)
    StableDiffusionPipeline.save_lora_weights(
        out_dir, weight_name=weights_name, safe_serialization=True, **layers
    )
    return out_dir / weights_name
