"""The OpenVINO engine's noise is torch.randn's for the same seed, drawn without torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd_lambda.engine.torch_noise import TorchNormal

# torch's vectorised Box-Muller and numpy's scalar one differ in the last float bits.
TOLERANCE = 1e-5


@pytest.mark.parametrize("seed", [0, 42, 123456789, 2**32 - 1])
def test_draws_match_torch_randn_in_sequence(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    noise = TorchNormal(seed)
    # Latents first, then an ancestral scheduler's per-step noise, from the same stream; one size that is
    # not a multiple of 16 (torch redraws its last 16).
    # ... and the scalar path of tensors under 16 elements (an 8x8 image's latents), whose pairs carry
    # over from one draw to the next.
    for shape in [
        (1, 4, 64, 64),
        (1, 4, 1, 1),
        (1, 4, 8, 8),
        (1, 4, 9, 7),
        (1, 3),
        (2, 4, 96, 64),
        (1, 4, 2, 1),
    ]:
        expected = torch.randn(shape, generator=generator, dtype=torch.float32).numpy()
        drawn = noise.randn(shape)
        assert drawn.dtype == np.float32
        np.testing.assert_allclose(drawn, expected, atol=TOLERANCE, rtol=0)


def test_another_seed_is_other_numbers() -> None:
    assert np.abs(TorchNormal(1).randn((16,)) - TorchNormal(2).randn((16,))).max() > 0.1
    assert np.abs(TorchNormal(1).randn((4,)) - TorchNormal(2).randn((4,))).max() > 0.1
