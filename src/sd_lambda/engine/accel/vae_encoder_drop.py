"""Free the VAE's encoder half at load: text-to-image only decodes.

In SD 1.5 that is 34 M parameters, freed before the decoder is cast or copied to channels_last.
``vae.encode`` then fails loudly instead of running on missing weights.
"""

from __future__ import annotations

from typing import Any


def drop_vae_encoder(vae: Any) -> None:
    vae.encoder = None
    vae.quant_conv = None


class VaeEncoderDrop:
    """The registry's entry (sd_lambda.engine.accel.registry)."""

    @staticmethod
    def check(target: Any) -> str | None:
        if getattr(target.pipeline.vae, "encoder", None) is None:
            return "the VAE has no encoder to free"
        return None

    @staticmethod
    def apply(target: Any) -> str:
        drop_vae_encoder(target.pipeline.vae)
        return "the VAE's encoder and quant_conv freed"
