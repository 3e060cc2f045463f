"""Request defaults come from a release's config files, the same for a model and its OpenVINO export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sd_lambda.engine.model_defaults import read_model_defaults, vae_scale_factor


def test_a_model_and_its_openvino_export_have_the_same_defaults(
    tiny_model_dir: Path, tiny_openvino_model_dir: Path
) -> None:
    assert vae_scale_factor(tiny_model_dir) == vae_scale_factor(tiny_openvino_model_dir) == 8
    assert read_model_defaults(tiny_model_dir) == read_model_defaults(tiny_openvino_model_dir)
    assert read_model_defaults(tiny_openvino_model_dir, steps=20).num_inference_steps == 20


def test_a_config_without_a_needed_key_is_a_value_error_naming_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    config = copy / "unet" / "config.json"
    data = json.loads(config.read_text())
    del data["sample_size"]
    config.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unet/config\.json has no 'sample_size'"):
        read_model_defaults(copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(ValueError, match="has no decoder config"):
        vae_scale_factor(copy)
