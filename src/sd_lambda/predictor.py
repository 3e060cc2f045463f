"""The warm model of one execution environment: set up once, predict many.

Lambda caps the init phase at 10 s, so the model is loaded lazily by the first request that needs it,
then kept for the environment's lifetime. ``current`` is resolved once, at that load: the environment
keeps serving that revision even if the seeder switches ``current`` later (new environments pick up the
new one), as the EFS layout contract requires. A failed load is not cached: the next request retries,
so an environment started before seeding finished recovers on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_lambda.engine import Engine
from sd_lambda.errors import ApiError
from sd_lambda.layout import LayoutError, ModelNotSeededError, ModelPaths
from sd_lambda.settings import Settings

Loader = Callable[[Path, Settings], Engine]


@dataclass(frozen=True)
class Warm:
    """The loaded engine, and what this call spent loading it (0 when it was already warm)."""

    engine: Engine
    load_ms: float


class Predictor:
    """Holds at most one loaded ``Engine``; ``loads`` counts how many times a model was loaded."""

    def __init__(self, settings: Settings, loader: Loader = Engine.load) -> None:
        self.settings = settings
        self.paths = ModelPaths(settings.model_dir)
        self._loader = loader
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self.revision: str | None = None
        self.loads = 0

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def warm(self) -> Warm:
        """The engine, loading it first if this environment has none; raises ``ApiError`` 503 if it cannot."""
        with self._lock:
            if self._engine is not None:
                return Warm(self._engine, 0.0)
            started = time.perf_counter()
            release = self.resolve()
            try:
                engine = self._loader(release, self.settings)
            except (LayoutError, OSError, ValueError) as exc:
                # A revision that diffusers cannot read is an incomplete seed, not a bug in this code.
                raise ApiError(
                    503, "model_incomplete", f"cannot load the model at {release}: {_brief(exc)}"
                ) from exc
            self._engine, self.revision = engine, release.name
            self.loads += 1
            return Warm(engine, (time.perf_counter() - started) * 1000)

    def resolve(self) -> Path:
        """The release folder `current` points at now; raises ApiError 503 naming the expected path."""
        try:
            return self.paths.resolve_current()
        except ModelNotSeededError as exc:
            raise ApiError(503, "model_not_seeded", str(exc)) from exc

    def health(self) -> dict[str, Any]:
        """What this environment serves, without loading or generating anything."""
        import torch

        state: dict[str, Any] = {
            "model": self.settings.model_name,
            "model_dir": str(self.settings.model_dir),
            "loaded": self.loaded,
            "loads": self.loads,
        }
        if self._engine is not None:
            return {**state, "revision": self.revision, **self._engine.describe()}
        # Not loaded yet: report what a load would pick up and the configured (not measured) dtype.
        return {
            **state,
            "revision": self.paths.current_revision(),
            "dtype": self.settings.dtype,
            "threads": torch.get_num_threads(),
        }


def _brief(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
