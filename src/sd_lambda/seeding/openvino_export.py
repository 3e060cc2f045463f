"""Convert a diffusers Stable Diffusion folder into an OpenVINO IR release. Runs in the export venv.

    .venv-export/bin/python -m sd_lambda.seeding.openvino_export SOURCE OUTPUT

optimum-intel's exporter (the library behind ``optimum-cli export openvino``) writes the pipeline in its
layout: ``text_encoder/``, ``unet/``, ``vae_decoder/`` and ``vae_encoder/`` as ``openvino_model.xml`` +
``.bin``, the tokenizer also as OpenVINO IR (openvino-tokenizers), configs as they were. That layout is
what OpenVINO GenAI's Text2ImagePipeline and optimum-intel's own pipeline load, and what ready-made
OpenVINO repos on the hub hold. A tiny decoder (``vae_tiny/``, AutoencoderKL-compatible TAESD) is
converted next to it with ``openvino.convert_model``, with the config keys GenAI's AutoencoderKL reads.

optimum-intel, NNCF and torch live only in the export venv (``make install-export``): the seed driver
(sd_lambda.seeding, no torch) runs this module there as a child process and seeds what it writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sd_lambda.layout import TINY_DECODER_FOLDER

# GenAI's AutoencoderKL reads these from the decoder's config.json (block_out_channels: the number of
# upsampling stages, i.e. the latent-to-pixel factor).
_DECODER_CONFIG_KEYS = ("in_channels", "out_channels", "latent_channels", "scaling_factor", "shift_factor")


def export_pipeline(source: Path, output: Path) -> None:
    from optimum.exporters.openvino import main_export

    main_export(
        str(source),
        output=output,  # a Path: its tokenizer step joins paths with /
        task="text-to-image",
        library_name="diffusers",
        local_files_only=True,
        convert_tokenizer=True,
    )


def export_tiny_decoder(source: Path, output: Path) -> None:
    """``source``'s AutoencoderTiny decoder as ``output``/openvino_model.xml + config.json."""
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
    output.mkdir(parents=True, exist_ok=True)
    openvino.save_model(model, output / "openvino_model.xml")
    described = {key: config[key] for key in _DECODER_CONFIG_KEYS if key in config}
    described["block_out_channels"] = list(config.decoder_block_out_channels)
    described["_class_name"] = "AutoencoderTiny"
    (output / "config.json").write_text(json.dumps(described, indent=2) + "\n")


def export(source: Path, output: Path) -> None:
    export_pipeline(source, output)
    if (source / TINY_DECODER_FOLDER).is_dir():
        export_tiny_decoder(source / TINY_DECODER_FOLDER, output / TINY_DECODER_FOLDER)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_lambda.seeding.openvino_export", description=__doc__)
    parser.add_argument("source", type=Path, help="a diffusers Stable Diffusion folder")
    parser.add_argument("output", type=Path, help="an empty or missing folder for the OpenVINO release")
    args = parser.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        print(f"openvino_export: {args.output} is not empty", file=sys.stderr)
        return 2
    export(args.source, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
