"""Read a model's weights into the page cache in the background while Python imports torch and diffusers.

On a cold start none of the model is in memory. The engine memory-maps its safetensors, so the
weights would arrive by page faults, in the order loading and the first image touch them: small
reads, each one waiting for the disk (on Lambda, for EFS over NFS). Importing torch, diffusers and
transformers takes seconds of CPU and leaves the disk idle. Where ``SD_ACCEL`` selects it (opt-in;
docs/performance.md says where it pays), the handler starts this pass before those imports, so one
sequential read per file overlaps them, and the engine's mappings then fault from the page cache.
Measured in ``sd-lambda bench --cold``.

This is best effort. It never raises. It stops at the first file it cannot read. It is skipped when
the weights would take more than half the available memory, because then they would push each
other (or the model's working memory) out before they are used. The same pages are mapped by the
engine afterwards, so it costs no memory beyond what loading the model costs anyway.

Standard library only: it runs before torch is imported.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from sd_lambda.engine import cpu
from sd_lambda.layout import (
    BF16_COPY_COMPONENTS,
    TINY_DECODER_FOLDER,
    LayoutError,
    ModelPaths,
    bf16_copy_files,
    plain_weights,
)
from sd_lambda.settings import Settings

# The order loading and the first image touch them: the text encoder runs at load (the empty
# prompt's embedding), the decoders are copied to channels_last at load, the UNet runs last.
WEIGHT_FOLDERS = ("text_encoder", "vae", TINY_DECODER_FOLDER, "unet")
CHUNK_BYTES = 8 << 20
PROC_MEMINFO = Path("/proc/meminfo")
# Prefetch only weights that fit in this share of MemAvailable.
MEMORY_SHARE = 0.5
# Every prefetch this process set up (started or skipped), by the release folder it reads: the engine
# does not start one (the handler's init or a bench worker does), so its registry entry reports this.
STARTED: dict[Path, WeightPrefetch] = {}


def weight_files(model_dir: Path, bf16: bool = False) -> list[Path]:
    """The safetensors the engine loads, in the order it touches them (symlinks followed): with
    ``bf16``, a complete bf16 copy (sd_lambda.engine.accel.bf16_copy) in place of the stored weights it
    covers."""
    copies = bf16_copy_files(model_dir) if bf16 else None
    copy_of = dict(zip(BF16_COPY_COMPONENTS, copies, strict=True)) if copies else {}
    files = []
    for folder in WEIGHT_FOLDERS:
        files += [copy_of[folder]] if folder in copy_of else plain_weights(model_dir / folder)
    return [path for path in files if path.is_file()]


def expects_bf16_copy(settings: Settings) -> bool:
    """Whether the engine will load a bf16 copy (where the model has one): it runs bf16, by the setting
    or the CPU flags, read without importing torch. The engine decides for itself (with ``auto`` it also
    asks torch for an AVX-512 capability); a wrong guess here costs the prefetch its use, not results."""
    if "bf16_copy" not in settings.accelerations:
        return False
    if settings.dtype == "auto":
        return cpu.has_native_bf16(cpu.read_cpu_flags())
    return settings.dtype == "bfloat16"


def memory_available(meminfo: Path = PROC_MEMINFO) -> int | None:
    """MemAvailable in bytes, or None where /proc/meminfo does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class WeightPrefetch:
    """One background pass over ``files``; ``describe()`` says how far it got."""

    def __init__(self, files: list[Path], folder: Path | None = None) -> None:
        self.files = files
        # The release it reads (the predictor cancels it when it loads another one).
        self.folder = folder
        self.total_bytes = sum(_size(path) for path in files)
        self.bytes_read = 0
        self.error: str | None = None
        self.skip_reason: str | None = None
        self._started: float | None = None
        self._interrupted = False
        self._seconds = 0.0
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None

    def skip(self, reason: str) -> WeightPrefetch:
        """Mark the pass as not to be run, saying why (before ``start``)."""
        self.skip_reason = reason
        self._finished.set()
        return self

    def start(self) -> WeightPrefetch:
        if self._thread is None and self.skip_reason is None:
            self._thread = threading.Thread(target=self._run, name="sd-lambda-prefetch", daemon=True)
            self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """True once the pass has ended (read everything, failed, was cancelled or skipped)."""
        return self._finished.wait(timeout)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def seconds(self) -> float:
        """How long the pass took, or has taken so far."""
        if self._started is not None and not self._finished.is_set():
            return time.perf_counter() - self._started
        return self._seconds

    @property
    def state(self) -> str:
        if self.skip_reason is not None:
            return "skipped"
        if not self._finished.is_set():
            return "reading" if self._thread is not None else "not started"
        if self.error is not None:
            return "failed"
        return "cancelled" if self._interrupted else "done"

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "state": self.state,
            "files": len(self.files),
            "bytes": self.total_bytes,
            "read_bytes": self.bytes_read,
            "seconds": round(self.seconds, 3),
        }
        if self.folder is not None:
            described["folder"] = str(self.folder)
        reason = self.skip_reason or self.error
        return {**described, "reason": reason} if reason else described

    def _run(self) -> None:
        self._started = time.perf_counter()
        path: Path | str = os.devnull
        try:
            with open(os.devnull, "wb") as sink:
                for path in self.files:
                    if self._cancelled.is_set():
                        self._interrupted = True
                        break
                    self._read(path, sink.fileno())
        except OSError as exc:
            self.error = f"{path}: {exc.strerror or exc}"
        finally:
            self._seconds = time.perf_counter() - self._started
            self._finished.set()

    def _read(self, path: Path, sink: int) -> None:
        with open(path, "rb", buffering=0) as file:
            with contextlib.suppress(AttributeError, OSError):  # a hint (larger readahead), not a need
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            offset, buffer = 0, None
            while True:
                if self._cancelled.is_set():
                    self._interrupted = True
                    return
                if buffer is None:
                    try:
                        # Into the page cache without a copy to user space: Linux splices to /dev/null.
                        read = os.sendfile(sink, file.fileno(), offset, CHUNK_BYTES)
                    except OSError:  # to a file (not a socket), from a regular file: Linux only
                        buffer = memoryview(bytearray(CHUNK_BYTES))
                        if offset:
                            file.seek(offset)
                        continue
                else:
                    read = file.readinto(buffer) or 0
                if not read:
                    return
                offset += read
                self.bytes_read += read


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def prefetch_model(model_dir: Path, meminfo: Path = PROC_MEMINFO, bf16: bool = False) -> WeightPrefetch:
    """Start reading ``model_dir``'s weights (``bf16``: its bf16 copy where complete) in the background,
    or return a skipped prefetch saying why."""
    prefetch = _set_up(model_dir, meminfo, bf16)
    STARTED[_folder_key(model_dir)] = prefetch
    return prefetch


def _folder_key(folder: Path) -> Path:
    try:
        return Path(folder).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11)
        return Path(folder)


def _set_up(model_dir: Path, meminfo: Path, bf16: bool) -> WeightPrefetch:
    try:
        files = weight_files(model_dir, bf16)
    except OSError as exc:  # e.g. EFS unreachable or a release pruned meanwhile: the load will say
        reason = f"cannot list {model_dir}: {exc.strerror or exc}"
        return WeightPrefetch([], folder=model_dir).skip(reason)
    prefetch = WeightPrefetch(files, folder=model_dir)
    if not files:
        return prefetch.skip(f"no safetensors in {model_dir}")
    available = memory_available(meminfo)
    if available is not None and prefetch.total_bytes > MEMORY_SHARE * available:
        total, free = prefetch.total_bytes / 1e9, available / 1e9
        reason = f"{total:.1f} GB of weights, {free:.1f} GB available"
        return prefetch.skip(reason)
    return prefetch.start()


def prefetch_current(settings: Settings) -> WeightPrefetch | None:
    """The handler's init: prefetch the revision ``current`` points at now. None when not selected
    (``SD_ACCEL``) or when nothing is seeded yet (the first request reports that)."""
    if "prefetch" not in settings.accelerations:
        return None
    try:
        release = ModelPaths(settings.model_dir).resolve_current()
    except (LayoutError, OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11)
        return None
    return prefetch_model(release, bf16=expects_bf16_copy(settings))


class Prefetch:
    """The registry's entry (sd_lambda.engine.accel.registry). The handler applies it at init, before
    the engine exists; the engine reports whether a prefetch of the release it loads was started in this
    process, and why not (nothing seeded at init, another revision, skipped) when it was not."""

    @staticmethod
    def check(target: Any) -> str | None:
        prefetch = STARTED.get(_folder_key(target.model_dir))
        if prefetch is None:
            return "no prefetch of this release in this process (nothing seeded at init, or another revision)"
        if prefetch.skip_reason is not None:
            return f"the init's prefetch was skipped: {prefetch.skip_reason}"
        return None

    @staticmethod
    def apply(target: Any) -> str:
        return "the init reads the weights ahead (prefetch in /health)"
