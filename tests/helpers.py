"""Constants and plain helpers shared across the suite; fixtures live in the conftest.py files."""

from __future__ import annotations

from pathlib import Path

from sd_lambda.layout import ModelPaths, install_release

TEST_MODEL_NAME = "test--tiny-sd"
TEST_REVISION = "r1"


def seed_release(model_root: Path, name: str, revision: str, source_dir: Path) -> ModelPaths:
    """Install ``source_dir`` as ``<root>/<name>/releases/<revision>`` and point ``current`` at it."""
    paths = ModelPaths(model_root / name)
    install_release(paths, revision, source_dir)
    return paths
