"""glibc's heap between the denoiser and the decoder.

The UNet's activations (a few MB each at 512², under glibc's mmap threshold) come from the heap, and
when a step ends glibc keeps their pages for reuse. The full VAE decoder then allocates its
134-268 MB activations (above the threshold, so fresh mappings) on top of those kept pages, which
would still be resident at the decode's peak. ``heap_trim`` hands them back (``malloc_trim``) before
each decode, and again before each of the full decoder's up blocks, whose lower resolutions leave
their own heap-sized activations behind: a diffusers hook (``pre_forward``) on each of those modules.
``heap_keep`` is the opposite trade: never unmap, so big activations are not page-faulted in again
on every step, at more peak RSS. docs/performance.md has what both measured.

Both are no-ops (returning False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Keep freed memory in glibc's heap instead of unmapping it: large activations are reallocated
    every step, and a fresh mmap costs a page fault per 4 KiB. Returns False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def return_freed_memory() -> bool:
    """Give the heap's free pages back to the kernel; True if glibc released any."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


HOOK = "sd_lambda.heap_trim"


def _no_glibc() -> str | None:
    return None if _glibc() is not None else "the C library is not glibc (no malloc_trim/mallopt)"


class HeapTrim:
    """The registry's entry (sd_lambda.engine.accel.registry)."""

    @staticmethod
    def check(target: Any) -> str | None:
        return _no_glibc()

    @staticmethod
    def apply(target: Any) -> str:
        from diffusers.hooks import HookRegistry, ModelHook

        class ReturnFreedMemory(ModelHook):
            def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict]:
                return_freed_memory()
                return args, kwargs

        decoder = target.pipeline.vae.decoder
        up_blocks = [block.resnets[0] for block in decoder.up_blocks if getattr(block, "resnets", None)]
        decoders = [decoder, *([target.tiny_decoder.decoder] if target.tiny_decoder is not None else [])]
        for module in decoders + up_blocks:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(ReturnFreedMemory(), HOOK)
        return f"before each decode ({len(decoders)} decoders) and each of {len(up_blocks)} VAE up blocks"


class HeapKeep:
    """The registry's entry (sd_lambda.engine.accel.registry)."""

    @staticmethod
    def check(target: Any) -> str | None:
        if "heap_trim" in target.selected:
            return "heap_trim is selected, and it hands back what this would keep"
        return _no_glibc()

    @staticmethod
    def apply(target: Any) -> str:
        return "freed memory kept in the heap" if keep_freed_memory() else "mallopt refused: stock heap"
