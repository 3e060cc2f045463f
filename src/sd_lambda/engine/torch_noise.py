"""``torch.randn``'s numbers for a seed, without torch: the OpenVINO engine's seed-to-noise mapping.

diffusers draws a request's initial latents (and an ancestral scheduler's noise) with ``torch.randn`` on
``torch.Generator().manual_seed(seed)``. Drawing the same numbers here lets a seed give the torch
engine's image on the OpenVINO engine, in an image that has no torch (GenAI's own TorchGenerator calls
torch). How torch draws them (aten/src/ATen/native/cpu/DistributionTemplates.h, ``normal_fill``):

- the CPU generator is MT19937 seeded with the 32-bit seed by ``init_genrand``, as numpy's legacy
  ``RandomState(seed)`` is, and each uniform takes the low 24 bits of one 32-bit output, times 2**-24;
- a float tensor of 16 or more elements gets one uniform per element, then Box-Muller over blocks of 16
  (element j and j + 8 of a block make a pair); when the size is not a multiple of 16, the last 16
  elements are drawn again and transformed as one more block;
- a smaller tensor (an 8x8 or 16x8 image's latents) takes each element from ``normal_distribution<double>``:
  two 53-bit uniforms (two 32-bit outputs each, the first the high half) give a Box-Muller pair, the
  cosine now and the sine kept by the generator for the next scalar draw.

torch computes the transform with vector math, so values agree to about 1e-6, not bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 16


class TorchNormal:
    """The normal numbers ``torch.randn`` draws from ``torch.Generator().manual_seed(seed)``, in order."""

    def __init__(self, seed: int) -> None:
        self._state = np.random.RandomState(seed & 0xFFFFFFFF)
        self._next_scalar: float | None = None  # the sine of the last scalar pair, as torch keeps it

    def _uniforms(self, count: int) -> np.ndarray:
        raw = self._state.randint(0, 2**32, size=count, dtype=np.uint32)
        return ((raw & 0xFFFFFF).astype(np.float64) * 2.0**-24).astype(np.float32)

    def _scalar(self) -> float:
        if self._next_scalar is not None:
            value, self._next_scalar = self._next_scalar, None
            return value
        u1, u2 = (self._uniform53() for _ in range(2))
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_scalar = radius * math.sin(theta)
        return radius * math.cos(theta)

    def _uniform53(self) -> float:
        high, low = (int(v) for v in self._state.randint(0, 2**32, size=2, dtype=np.uint64))
        return ((high << 32 | low) & ((1 << 53) - 1)) * 2.0**-53

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of ``shape``."""
        size = math.prod(shape)
        if size < BLOCK:
            return np.array([self._scalar() for _ in range(size)], dtype=np.float32).reshape(shape)
        data = self._uniforms(size)
        whole = size // BLOCK * BLOCK
        _box_muller(data[:whole].reshape(-1, BLOCK))
        if size % BLOCK:
            tail = self._uniforms(BLOCK).reshape(1, BLOCK)
            _box_muller(tail)
            data[size - BLOCK :] = tail[0]
        return data.reshape(shape)


def _box_muller(blocks: np.ndarray) -> None:
    """In place, per row of 16 uniforms: (u1, u2) = (1 - row[j], row[j + 8]) -> two standard normals."""
    half = BLOCK // 2
    radius = np.sqrt(-2 * np.log(1 - blocks[:, :half]))
    theta = 2.0 * np.pi * blocks[:, half:].astype(np.float64)
    cos, sin = radius * np.cos(theta), radius * np.sin(theta)
    blocks[:, :half] = cos.astype(np.float32)
    blocks[:, half:] = sin.astype(np.float32)
