"""Fixtures shared across the suite. The tiny model is built once per session (about a second)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sd_lambda.bf16_copy import add_bf16_copy
from sd_lambda.layout import ModelPaths, install_release
from sd_lambda.testing.models import build_test_model

TEST_MODEL_NAME = "test--tiny-sd"
TEST_REVISION = "r1"


@pytest.fixture(scope="session", autouse=True)
def no_ambient_aws_region() -> Iterator[None]:
    """Offline plans read AWS_REGION/AWS_DEFAULT_REGION as the aws provider does; a developer's own
    must not change what the tests see. Tests that need one set it themselves."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("AWS_REGION", raising=False)
        patch.delenv("AWS_DEFAULT_REGION", raising=False)
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny pipeline (with vae_tiny/) in diffusers layout. Treat as read-only."""
    return build_test_model(tmp_path_factory.mktemp("tiny-model") / "model", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_with_bf16_copy(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline plus its weights' bf16 copy (sd_lambda.bf16_copy). Treat as read-only."""
    model = tmp_path_factory.mktemp("tiny-model-bf16-copy") / "model"
    shutil.copytree(tiny_model_dir, model)
    add_bf16_copy(model)
    return model


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
