"""glibc's heap between the denoiser and the decoder.

The UNet's activations (a few MB each at 512², under glibc's mmap threshold) come from the heap, and
when a step ends glibc keeps their pages for reuse. The full VAE decoder then allocates its
134-268 MB activations (above the threshold, so fresh mappings) on top of those kept pages: measured
at 512² under AVX2, 140-340 MB of freed UNet memory was still resident when the decode reached its
peak. ``return_freed_memory`` hands them back (``malloc_trim``, 12-27 ms) before the decode, and
again before each of the decoder's up blocks (1-7 ms each), whose lower resolutions leave their own
heap-sized activations behind (another 100 MB off the peak).
``keep_freed_memory`` is the opposite trade, opt-in: never unmap, so big activations are not
page-faulted in again on every step, at more peak RSS.

Both are no-ops (returning False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import functools

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
    every step, and a fresh mmap costs a page fault per 4 KiB (measured: a third of the full VAE
    decode's system time). Returns False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def return_freed_memory() -> bool:
    """Give the heap's free pages back to the kernel; True if glibc released any."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
