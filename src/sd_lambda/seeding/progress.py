"""Progress lines for the driver's long waits: plain lines on stderr, at most one every ``EVERY_S``
seconds (no progress bars: the output is often a log, not a terminal)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

EVERY_S = 15.0


@dataclass
class Ticker:
    """Call it on every poll; it passes the first message and then one per ``every_s`` to ``log``."""

    log: Callable[[str], None]
    clock: Callable[[], float]
    every_s: float = EVERY_S
    started: float = field(init=False)
    _last: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def __call__(self, message: str) -> None:
        now = self.clock()
        if self._last is None or now - self._last >= self.every_s:
            self._last = now
            self.log(f"{message} ({now - self.started:.0f} s)")


def _amount(done: int, total: int) -> str:
    """``1.2/4.3 GB``: both in the unit that suits the total."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if total >= size:
            return f"{done / size:.1f}/{total / size:.1f} {unit}"
    return f"{done}/{total} bytes"


def describe_sync(text: str) -> str | None:
    """The progress line for the seeder's sync progress file (``efs_sync.Progress``), e.g.
    ``sync: 1.2/4.3 GB, 12/37 files, downloading``; None for anything else (empty, not that JSON)."""
    try:
        state = json.loads(text)
        phase = state["phase"]
        counts = [state[key] for key in ("bytes_done", "bytes_total", "files_done", "files_total")]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(phase, str) or not all(type(count) is int and count >= 0 for count in counts):
        return None
    bytes_done, bytes_total, files_done, files_total = counts
    if not files_total:  # the manifest is not read yet (or the release is there already)
        return f"sync: {phase}"
    return f"sync: {_amount(bytes_done, bytes_total)}, {files_done}/{files_total} files, {phase}"
