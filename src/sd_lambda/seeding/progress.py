"""Progress lines for the driver's long waits: plain lines on stderr, at most one every ``EVERY_S``
seconds (no progress bars: the output is often a log, not a terminal)."""

from __future__ import annotations

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
