"""Fixtures shared across the suite. The tiny model is built once per session (about a second)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_lambda.layout import ModelPaths, install_release
from sd_lambda.testing.models import build_test_model

TEST_MODEL_NAME = "test--tiny-sd"
TEST_REVISION = "r1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny pipeline (with vae_tiny/) in diffusers layout. Treat as read-only."""
    return build_test_model(tmp_path_factory.mktemp("tiny-model") / "model", "tiny", seed=0)


def seed_release(model_root: Path, name: str, revision: str, source_dir: Path) -> ModelPaths:
    """Install ``source_dir`` as ``<root>/<name>/releases/<revision>`` and point ``current`` at it."""
    paths = ModelPaths(model_root / name)
    install_release(paths, revision, source_dir)
    return paths


@pytest.fixture
def model_root(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A MODEL_ROOT in the EFS layout with the tiny model seeded as TEST_MODEL_NAME/current."""
    root = tmp_path / "models"
    seed_release(root, TEST_MODEL_NAME, TEST_REVISION, tiny_model_dir)
    return root
