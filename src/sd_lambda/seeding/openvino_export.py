"""Convert a diffusers Stable Diffusion folder into an OpenVINO IR release. Runs in the export venv.

    .venv-export/bin/python -m sd_lambda.seeding.openvino_export SOURCE OUTPUT
        [--weight-format fp16|fp32] [--quantize int8] [--calibration-prompts FILE] [--calibration-samples N]

optimum-intel's exporter (the library behind ``optimum-cli export openvino``) writes the pipeline in its
layout: ``text_encoder/``, ``unet/``, ``vae_decoder/`` and ``vae_encoder/`` as ``openvino_model.xml`` +
``.bin``, the tokenizer also as OpenVINO IR (openvino-tokenizers), configs as they were. That layout is
what OpenVINO GenAI's Text2ImagePipeline and optimum-intel's own pipeline load, and what ready-made
OpenVINO repos on the hub hold. A tiny decoder (``vae_tiny/``, AutoencoderKL-compatible TAESD) is
converted next to it with ``openvino.convert_model``, with the config keys GenAI's AutoencoderKL reads.

``--weight-format`` is how the floating-point export stores its weights (optimum-cli's option of that
name): ``fp16`` by default, as the ready-made OpenVINO repos on the hub ship them. The engine computes at
its inference precision (f32 on AVX2: the CPU plugin widens the weights once, at compile time), so fp16
storage costs no speed and changes the image by the rounding of the weights only, while it halves the
release (what EFS reads at every cold start) and the IR the compile maps beside its own copy
(docs/performance.md).

``--quantize int8`` is optimum-intel's hybrid quantisation for diffusion pipelines
(``OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=<prompts>)``): the UNet's
activations and weights go to int8 with ranges calibrated by running the real (OpenVINO) pipeline on
prompts, its MatMul weights and every weight of the text encoder and the VAE decoder/encoder are
compressed to int8 (weights only). The tiny decoder gets the same weight compression. The prompts are a
built-in list (no dataset download: an operator machine may be offline) or a file, one prompt a line.

optimum-intel, NNCF and torch live only in the export venv (``make install-export``): the seed driver
(sd_lambda.seeding, no torch) runs this module there as a child process and seeds what it writes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from sd_lambda.layout import TINY_DECODER_FOLDER

# GenAI's AutoencoderKL reads these from the decoder's config.json (block_out_channels: the number of
# upsampling stages, i.e. the latent-to-pixel factor).
_DECODER_CONFIG_KEYS = ("in_channels", "out_channels", "latent_channels", "scaling_factor", "shift_factor")
QUANTIZE_MODES = ("int8",)
WEIGHT_FORMATS = ("fp16", "fp32")
DEFAULT_WEIGHT_FORMAT = "fp16"
# optimum-intel's own default for a hybrid-quantised UNet
# (optimum.intel.openvino.quantization._get_hybrid_mixed_quantization_config).
# One sample is one UNet call: optimum runs each prompt through its pipeline's default 50 steps, so 200
# samples take 4 prompts' whole denoising trajectories (every timestep's activation ranges).
DEFAULT_CALIBRATION_SAMPLES = 200
# Calibration prompts when no file is given: varied subjects, styles and lengths, like user prompts.
CALIBRATION_PROMPTS = (
    "a red fox in the snow, golden hour, photograph",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen on a wooden table, studio lighting, 50mm",
    "portrait of an old fisherman with a grey beard, oil painting",
    "a futuristic city skyline at night with neon signs, cyberpunk",
    "watercolor painting of a lighthouse on a cliff in a storm",
    "a cozy living room with a fireplace and bookshelves, interior design",
    "a cat wearing a tiny wizard hat, cute, highly detailed",
    "mountain lake at sunrise with mist, landscape photography",
    "a vintage red car parked on a cobblestone street in Paris",
    "pixel art of a castle on a floating island",
    "macro photo of a dew drop on a green leaf",
    "a medieval knight in shining armor, dramatic lighting, concept art",
    "an isometric illustration of a small coffee shop",
    "a bustling market in Marrakech, colorful spices, people",
    "black and white photo of a jazz musician playing saxophone",
)


def export_pipeline(source: Path, output: Path, weight_format: str = DEFAULT_WEIGHT_FORMAT) -> None:
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    main_export(
        str(source),
        output=output,  # a Path: its tokenizer step joins paths with /
        task="text-to-image",
        library_name="diffusers",
        local_files_only=True,
        convert_tokenizer=True,
        ov_config=OVConfig(dtype=weight_format),  # fp16: save_model(compress_to_fp16=True)
    )


def quantize_pipeline(exported: Path, output: Path, prompts: list[str], samples: int) -> None:
    """``exported`` (optimum-intel's layout, floating point) hybrid-quantised to int8 into ``output``: a
    copy of ``exported`` with each model's IR replaced by the quantised one. Everything else (the
    tokenizer IR, the configs) is the export's own: optimum's save_pretrained writes the tokenizer
    without its IR."""
    from optimum.intel import OVDiffusionPipeline, OVWeightQuantizationConfig

    config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=prompts, num_samples=samples)
    pipeline = OVDiffusionPipeline.from_pretrained(exported, compile=False, quantization_config=config)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}-int8-") as quantized:
        pipeline.save_pretrained(quantized)
        shutil.copytree(exported, output, dirs_exist_ok=True)
        for graph in Path(quantized).glob("*/openvino_model.xml"):
            for part in (graph, graph.with_suffix(".bin")):
                shutil.copyfile(part, output / part.relative_to(quantized))


def export_tiny_decoder(
    source: Path, output: Path, *, weight_format: str = DEFAULT_WEIGHT_FORMAT, compress_weights: bool = False
) -> None:
    """``source``'s AutoencoderTiny decoder as ``output``/openvino_model.xml + config.json, its weights
    stored as ``weight_format``; with ``compress_weights`` in int8 (NNCF's weight compression, as the VAE
    decoder gets)."""
    import openvino
    import torch
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny.from_pretrained(source, use_safetensors=True).eval()

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latent_sample, return_dict=False)[0]

    config = vae.config
    with torch.no_grad():
        model = openvino.convert_model(Decoder(), example_input=torch.zeros(1, config.latent_channels, 8, 8))
    model.inputs[0].get_tensor().set_names({"latent_sample"})
    model.outputs[0].get_tensor().set_names({"sample"})
    if compress_weights:
        import nncf

        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    output.mkdir(parents=True, exist_ok=True)
    openvino.save_model(model, output / "openvino_model.xml", compress_to_fp16=weight_format == "fp16")
    described = {key: config[key] for key in _DECODER_CONFIG_KEYS if key in config}
    described["block_out_channels"] = list(config.decoder_block_out_channels)
    described["_class_name"] = "AutoencoderTiny"
    (output / "config.json").write_text(json.dumps(described, indent=2) + "\n")


class ExportError(Exception):
    """A source this environment cannot export faithfully; main() prints it as one line."""


def check_weights_map(source: Path) -> None:
    """Refuse a component whose checkpoint names tensors this environment's libraries do not look for.

    transformers and diffusers initialise such parameters at random with a warning, and the exporter
    would write that randomness as the model: e.g. a text encoder saved by a newer transformers, whose
    tensor names the export venv's older transformers (optimum-intel caps it) no longer maps."""
    import importlib

    index = json.loads((source / "model_index.json").read_text())
    for component in ("text_encoder", "unet", "vae"):
        library, class_name = (index.get(component) or [None, None])[:2]
        if library not in ("transformers", "diffusers") or not (source / component).is_dir():
            continue
        model_class = getattr(importlib.import_module(library), class_name)
        _, info = model_class.from_pretrained(source / component, output_loading_info=True)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            version = importlib.import_module(library).__version__
            raise ExportError(
                f"{component}: {len(missing)} weights {library} {version} looks for are not in the "
                f"checkpoint (e.g. {missing[0]}); exporting would write random weights. The checkpoint was "
                f"probably saved by another {library} version: save it with tensor names this one reads"
            )


def export(
    source: Path,
    output: Path,
    quantize: str | None = None,
    prompts: list[str] | None = None,
    samples: int = DEFAULT_CALIBRATION_SAMPLES,
    weight_format: str = DEFAULT_WEIGHT_FORMAT,
) -> None:
    """``source`` exported into ``output``, its float weights stored as ``weight_format``. A quantised
    export starts from an fp32 one, as optimum-intel's own quantisation does: its weights become int8
    and ``weight_format`` applies to nothing."""
    check_weights_map(source)
    if quantize is None:
        export_pipeline(source, output, weight_format)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}-float-") as exported:
            export_pipeline(source, Path(exported), "fp32")
            quantize_pipeline(Path(exported), output, prompts or list(CALIBRATION_PROMPTS), samples)
    if (source / TINY_DECODER_FOLDER).is_dir():
        export_tiny_decoder(
            source / TINY_DECODER_FOLDER,
            output / TINY_DECODER_FOLDER,
            weight_format="fp16" if quantize else weight_format,
            compress_weights=quantize is not None,
        )


def read_prompts(path: Path) -> list[str]:
    """One prompt a line; blank lines are skipped."""
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one a line)")
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sd_lambda.seeding.openvino_export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="a diffusers Stable Diffusion folder")
    parser.add_argument("output", type=Path, help="an empty or missing folder for the OpenVINO release")
    parser.add_argument(
        "--weight-format",
        choices=WEIGHT_FORMATS,
        help="how the float export stores its weights; the engine computes at its inference precision "
        f"(default: {DEFAULT_WEIGHT_FORMAT}; not with --quantize, whose weights are int8)",
    )
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, help="hybrid int8 quantisation (NNCF)")
    parser.add_argument(
        "--calibration-prompts",
        type=Path,
        metavar="FILE",
        help="prompts for --quantize's calibration, one a line (default: a built-in list)",
    )
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=DEFAULT_CALIBRATION_SAMPLES,
        metavar="N",
        help="UNet calls recorded for --quantize's calibration (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.quantize is None and args.calibration_prompts is not None:
        parser.error("--calibration-prompts applies to --quantize")
    if args.calibration_samples < 1:
        parser.error("--calibration-samples must be at least 1")
    if args.quantize is not None and args.weight_format is not None:
        parser.error("--weight-format applies to a float export: --quantize stores int8 weights")
    if args.output.exists() and any(args.output.iterdir()):
        parser.error(f"{args.output} is not empty")
    try:
        prompts = read_prompts(args.calibration_prompts) if args.calibration_prompts else None
    except (OSError, ValueError) as exc:
        parser.error(f"--calibration-prompts: {exc}")
    try:
        export(
            args.source,
            args.output,
            args.quantize,
            prompts,
            args.calibration_samples,
            args.weight_format or DEFAULT_WEIGHT_FORMAT,
        )
    except ExportError as exc:
        print(f"openvino_export: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
