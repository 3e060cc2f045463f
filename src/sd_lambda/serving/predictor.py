"""The warm model of one execution environment: set up once, predict many.

Lambda caps the init phase at 10 s, so the model is loaded lazily by the first request that needs it,
then kept for the environment's lifetime. ``current`` is read once, at that load: the environment
keeps serving that revision even if the seeder switches ``current`` later (new environments pick up the
new one), as the EFS layout contract requires. A failed load is not cached: the next request retries,
so an environment started before seeding finished recovers on its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sd_lambda.engine import cpu
from sd_lambda.engine.accel.prefetch import WeightPrefetch
from sd_lambda.engine.backend import Engine, load_engine
from sd_lambda.layout import LayoutError, ModelNotSeededError, ModelPaths
from sd_lambda.serving.errors import ApiError
from sd_lambda.serving.request import model_default_problems
from sd_lambda.settings import Settings

Loader = Callable[[Path, Settings], Engine]
# Seeding takes minutes: a client that retries sooner only adds load.
NOT_SEEDED_RETRY_AFTER_S = 60


@dataclass(frozen=True)
class Release:
    """What ``current`` pointed at when it was read: the revision name (the link's last component, as
    the seeder wrote it) and the folder to load it from."""

    revision: str
    folder: Path


@dataclass(frozen=True)
class Warm:
    """The loaded engine, and what this call spent loading it (0 when it was already warm)."""

    engine: Engine
    load_ms: float


class Predictor:
    """Holds at most one loaded ``Engine``; ``loads`` counts how many times a model was loaded.

    One caller at a time: ``exclusive()`` holds the lock across loading and generating, because an
    ``Engine`` is not thread-safe (and Lambda sends one invocation at a time anyway).
    """

    def __init__(
        self, settings: Settings, loader: Loader = load_engine, prefetch: WeightPrefetch | None = None
    ) -> None:
        self.settings = settings
        # The init's background read of the weights (sd_lambda.engine.accel.prefetch), reported by health().
        self.prefetch = prefetch
        self.paths = ModelPaths(settings.model_dir)
        self._loader = loader
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self.revision: str | None = None
        # Model defaults this function's limits refuse (field -> why), found once at load.
        self.default_problems: dict[str, str] = {}
        self.loads = 0

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    @contextmanager
    def exclusive(self) -> Iterator[Warm]:
        """The engine, loaded first if needed, for this caller alone until the block ends.

        Raises ``ApiError`` 503 if the model cannot be loaded.
        """
        with self._lock:
            yield self._warm_locked()

    def warm(self) -> Warm:
        """The engine, loading it first if this environment has none; raises ``ApiError`` 503 if it cannot."""
        with self.exclusive() as warm:
            return warm

    def _warm_locked(self) -> Warm:
        if self._engine is not None:
            return Warm(self._engine, 0.0)
        started = time.perf_counter()
        release = self.resolve()
        if self.prefetch is not None and self.prefetch.folder != release.folder.resolve():
            self.prefetch.cancel()  # current moved on since init: stop reading the old revision
        try:
            engine = self._loader(release.folder, self.settings)
        except (LayoutError, OSError, ValueError) as exc:
            # A revision the engine cannot read (each engine says so with these) is an incomplete seed or
            # a release for the other engine, not a bug here.
            raise ApiError(
                503, "model_incomplete", f"cannot load the model at {release.folder}: {_brief(exc)}"
            ) from exc
        self._engine, self.revision = engine, release.revision
        self.default_problems = model_default_problems(engine.defaults, self.settings)
        self.loads += 1
        return Warm(engine, (time.perf_counter() - started) * 1000)

    def resolve(self) -> Release:
        """Read ``current`` once; raises ApiError 503 (with Retry-After) naming the expected path."""
        current = self.paths.current
        try:
            target = os.readlink(current)
        except OSError:
            target = ""
        folder = current.parent / target
        if not target or not (folder / "model_index.json").is_file():
            retry = {"retry-after": str(NOT_SEEDED_RETRY_AFTER_S)}
            try:
                self.paths.resolve_current()  # the layout's own words for what is missing
            except ModelNotSeededError as exc:
                raise ApiError(503, "model_not_seeded", str(exc), headers=retry) from exc
            # `current` changed between the two reads: a switch is in progress.
            raise ApiError(503, "model_not_seeded", f"{current} is being switched; retry", headers=retry)
        return Release(PurePosixPath(target).name, folder)

    def health(self) -> dict[str, Any]:
        """What this environment serves, without loading or generating anything."""
        state: dict[str, Any] = {
            "model": self.settings.model_name,
            "model_dir": str(self.settings.model_dir),
            "loaded": self.loaded,
            "loads": self.loads,
        }
        if self.prefetch is not None:
            state["prefetch"] = self.prefetch.describe()
        if self._engine is not None:
            problems = {"default_problems": self.default_problems} if self.default_problems else {}
            return {**state, "revision": self.revision, **self._engine.describe(), **problems}
        # Not loaded yet: report what a load would pick up and the configured (not measured) dtype.
        return {
            **state,
            "revision": self.paths.current_revision(),
            "dtype": self.settings.dtype,
            "threads": cpu.choose_threads(self.settings)[0],
            # What a request could name once loaded (the torch engine runs them; the load says which).
            "loras": {"available": self.paths.adapter_names()},
        }


def _brief(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
