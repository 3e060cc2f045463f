"""Constants and plain helpers shared across the suite; fixtures live in the conftest.py files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sd_lambda.layout import ModelPaths, install_release

TEST_MODEL_NAME = "test--tiny-sd"
TEST_REVISION = "r1"
REPOSITORY = Path(__file__).resolve().parents[1]


def seed_release(model_root: Path, name: str, revision: str, source_dir: Path) -> ModelPaths:
    """Install ``source_dir`` as ``<root>/<name>/releases/<revision>`` and point ``current`` at it."""
    paths = ModelPaths(model_root / name)
    install_release(paths, revision, source_dir)
    return paths


def export_python() -> Path:
    """The export venv's python (``make install-export``; ``make test`` makes it first)."""
    return Path(os.environ.get("SD_LAMBDA_EXPORT_PYTHON") or REPOSITORY / ".venv-export" / "bin" / "python")


def export_openvino(source: Path, output: Path, *options: str) -> Path:
    """``source`` converted to an OpenVINO release at ``output`` by the real exporter, in the export venv."""
    python = export_python()
    if not python.is_file():
        pytest.fail(f"{python} is missing: run make install-export (make test does)")
    completed = subprocess.run(
        [str(python), "-m", "sd_lambda.seeding.openvino_export", str(source), str(output), *options],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        pytest.fail(f"the OpenVINO export failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return output


class FakeClock:
    """An injected clock (``time.monotonic``) and sleeper (``time.sleep``): sleeping advances the clock,
    nothing waits; ``sleeps`` records each sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
