"""Cast memory-mapped weights to another dtype without holding both copies in memory.

diffusers maps safetensors files and converts tensor by tensor, but every page of the mapped file it
reads stays resident until the whole component is done: converting SD 1.5's 3.4 GB fp32 UNet to bf16
peaks at 3.4 + 1.7 GB. Here each tensor's source pages are dropped (``MADV_DONTNEED``) right after it
is converted. That is only done to whole pages inside a just-converted tensor, in mappings of
``.safetensors`` files: the converted copy is taken first, the pages stay in the page cache, and they
re-fault from the file if anything reads them again.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

PROC_SELF_MAPS = Path("/proc/self/maps")
MADV_DONTNEED = 4


def file_mapped_ranges(suffix: str = ".safetensors", maps: Path = PROC_SELF_MAPS) -> list[tuple[int, int]]:
    """Sorted (start, end) address ranges of mappings of files whose name ends in ``suffix``."""
    ranges = []
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(suffix):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return sorted(ranges)


def _inside(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    index = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    return index >= 0 and ranges[index][0] <= start and end <= ranges[index][1]


class MappedPageReleaser:
    """Drops the resident pages of tensors that live in ``.safetensors`` file mappings once they are no
    longer used (``MADV_DONTNEED`` on whole pages inside each tensor). A no-op without such mappings."""

    def __init__(self) -> None:
        self._ranges = file_mapped_ranges()
        self._libc = ctypes.CDLL(None, use_errno=True) if self._ranges else None
        self.released = 0

    def release(self, tensor: torch.Tensor) -> None:
        if self._libc is None:
            return
        page = mmap.PAGESIZE
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        first, last = -(-start // page) * page, end // page * page  # whole pages only
        if last <= first or not _inside(self._ranges, first, last):
            return
        if self._libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0:
            self.released += last - first


def release_mapped_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the mapped pages of tensors that were replaced; returns the bytes dropped."""
    releaser = MappedPageReleaser()
    for tensor in tensors:
        releaser.release(tensor)
    return releaser.released


def cast_releasing_pages(module: torch.nn.Module, dtype: torch.dtype, channels_last: bool = False) -> int:
    """Cast floating-point parameters and buffers to ``dtype`` (and 4-d ones to channels_last when asked),
    in one copy per tensor; returns the bytes of mapped pages dropped."""
    releaser = MappedPageReleaser()
    tensors = [*module.named_parameters(recurse=True), *module.named_buffers(recurse=True)]
    for _, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        relayout = channels_last and tensor.dim() == 4
        if relayout and not tensor.is_contiguous(memory_format=torch.channels_last):
            new = tensor.data.to(dtype=dtype, memory_format=torch.channels_last)
        elif tensor.dtype != dtype:
            new = tensor.data.to(dtype)
        else:
            continue
        old = tensor.data
        tensor.data = new
        releaser.release(old)
    return releaser.released


def _decoders(target: Any) -> list[torch.nn.Module]:
    return [target.pipeline.vae, *([target.tiny_decoder] if target.tiny_decoder is not None else [])]


class ChannelsLast:
    """The registry's entry (sd_lambda.engine.accel.registry): the decoders are convolutions over
    full-resolution images, where channels_last lets oneDNN skip layout reorders. The UNet stays NCHW
    (measured no faster, and it would cost a weight copy). Cast in the same copy, releasing the mapped
    pages when page_release is selected too."""

    @staticmethod
    def check(target: Any) -> str | None:
        return None

    @staticmethod
    def apply(target: Any) -> str:
        for decoder in _decoders(target):
            if "page_release" in target.selected:
                cast_releasing_pages(decoder, target.dtype, channels_last=True)
            else:
                decoder.to(dtype=target.dtype, memory_format=torch.channels_last)
        return f"{len(_decoders(target))} decoders' weights; their inputs too"


class PageRelease:
    """The registry's entry (sd_lambda.engine.accel.registry): cast every component, dropping each
    source tensor's mapped pages."""

    @staticmethod
    def check(target: Any) -> str | None:
        return None

    @staticmethod
    def apply(target: Any) -> str:
        pipeline = target.pipeline
        components = [pipeline.text_encoder, pipeline.unet, *_decoders(target)]
        released = sum(cast_releasing_pages(component, target.dtype) for component in components)
        return f"{released / 1e9:.2f} GB of mapped pages released while casting"
