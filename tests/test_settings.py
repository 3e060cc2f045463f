from pathlib import Path

import pytest

from sd_lambda.settings import Settings, documented_variables


def test_defaults_point_at_the_efs_mount() -> None:
    settings = Settings.from_env({})
    assert settings.model_root == Path("/mnt/models")
    assert settings.model_dir == Path("/mnt/models/default")


def test_environment_overrides_with_types() -> None:
    settings = Settings.from_env({"MODEL_ROOT": "/tmp/m", "MODEL_NAME": "x--y", "SD_MAX_STEPS": "8"})
    assert settings.model_dir == Path("/tmp/m/x--y")
    assert settings.max_steps == 8


def test_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="SD_MAX_STEPS='many'"):
        Settings.from_env({"SD_MAX_STEPS": "many"})


def test_every_field_is_documented() -> None:
    rows = documented_variables()
    assert {"MODEL_ROOT", "MODEL_NAME"} <= {name for name, _, _ in rows}
    assert all(description for _, _, description in rows)
