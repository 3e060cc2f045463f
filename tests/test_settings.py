"""Settings: every environment variable, typed and validated in one place. Bad configuration fails when
Settings is built, naming the variable; it never looks like a bad model."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_lambda.engine.accel import registry
from sd_lambda.engine.generation import SCHEDULERS
from sd_lambda.settings import RETIRED_VARIABLES, Settings, documented_variables


def test_defaults_point_at_the_efs_mount() -> None:
    settings = Settings.from_env({})
    assert settings.model_root == Path("/mnt/models")
    assert settings.model_dir == Path("/mnt/models/default")


def test_environment_overrides_with_types() -> None:
    settings = Settings.from_env({"MODEL_ROOT": "/tmp/m", "MODEL_NAME": "x--y", "SD_MAX_STEPS": "8"})
    assert settings.model_dir == Path("/tmp/m/x--y")
    assert settings.max_steps == 8


def test_every_field_is_documented() -> None:
    rows = documented_variables()
    assert {"MODEL_ROOT", "MODEL_NAME"} <= {name for name, _, _ in rows}
    assert all(description for _, _, description in rows)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SD_DTYPE": "fp16"}, "SD_DTYPE='fp16' is not one of auto, float32, bfloat16"),
        ({"SD_DEFAULT_DECODER": "huge"}, "SD_DEFAULT_DECODER='huge' is not one of auto, full, tiny"),
        ({"SD_DEFAULT_SCHEDULER": "karras"}, "SD_DEFAULT_SCHEDULER='karras' is not one of auto, model, pndm"),
        ({"SD_MAX_STEPS": "0"}, "SD_MAX_STEPS=0 is below the minimum 1"),
        ({"SD_MAX_PIXELS": "-1"}, "SD_MAX_PIXELS=-1 is below the minimum"),
        ({"SD_MAX_SIDE": "0"}, "SD_MAX_SIDE=0 is below the minimum"),
        ({"SD_ACCEL": "fast"}, "SD_ACCEL='fast': unknown acceleration fast; known: prefetch, heap_keep"),
        ({"SD_ACCEL": "in_place,-heap_trim"}, "SD_ACCEL='in_place,-heap_trim' mixes names with"),
        ({"SD_MAX_RESPONSE_BYTES": "7000000"}, "SD_MAX_RESPONSE_BYTES=7000000 is above the maximum 6000000"),
        ({"SD_MAX_REQUEST_BYTES": "10"}, "SD_MAX_REQUEST_BYTES=10 is below the minimum"),
        ({"SD_MAX_IMAGES": "0"}, "SD_MAX_IMAGES=0 is below the minimum 1"),
        ({"SD_MAX_LORAS": "9"}, "SD_MAX_LORAS=9 is above the maximum 8"),
        (
            {"SD_MAX_REQUEST_BYTES": "65536"},
            "SD_MAX_INIT_IMAGE_BYTES=4000000 needs a request body of 5398872 bytes",
        ),
        ({"SD_MAX_STEPS": "many"}, "SD_MAX_STEPS='many' is not a valid int"),
    ],
)
def test_invalid_values_fail_naming_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        Settings.from_env(environ)


def test_every_scheduler_and_the_defaults_are_accepted() -> None:
    assert Settings() == Settings.from_env({})
    for name in ("auto", "model", *SCHEDULERS):
        assert Settings.from_env({"SD_DEFAULT_SCHEDULER": name}).default_scheduler == name
    assert Settings.from_env({"SD_MAX_RESPONSE_BYTES": "6000000"}).max_response_bytes == 6_000_000
    # A small request body is fine once the init image's limit fits in it.
    small = Settings.from_env({"SD_MAX_REQUEST_BYTES": "131072", "SD_MAX_INIT_IMAGE_BYTES": "49152"})
    assert (small.max_request_bytes, small.max_init_image_bytes) == (131_072, 49_152)


@pytest.mark.parametrize(
    ("value", "selected"),
    [
        ("", registry.DEFAULTS),
        ("default", registry.DEFAULTS),
        ("none", ()),
        ("all", registry.SAME_IMAGE),
        ("page_release, in_place", ("in_place", "page_release")),  # registry order, not the list's
        (
            "-in_place,+feature_reuse",
            tuple(
                sorted({*registry.DEFAULTS, "feature_reuse"} - {"in_place"}, key=list(registry.BY_NAME).index)
            ),
        ),
    ],
)
def test_sd_accel_selects_accelerations_in_registry_order(value: str, selected: tuple[str, ...]) -> None:
    assert Settings.from_env({"SD_ACCEL": value}).accelerations == selected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SD_PREFETCH": "1"}, "SD_PREFETCH was retired: use SD_ACCEL=+prefetch"),
        ({"SD_MALLOC_TUNE": "1"}, "SD_MALLOC_TUNE was retired: use SD_ACCEL=+heap_keep,-heap_trim"),
        ({"SD_SMALL_MAP_CONVS": "0"}, "SD_SMALL_MAP_CONVS was retired: use SD_ACCEL=-small_map_convs"),
        ({"SD_BF16_COPY": "1"}, "SD_BF16_COPY was retired: use SD_ACCEL=+bf16_copy"),
        ({"SD_FEATURE_REUSE": "2"}, "SD_FEATURE_REUSE was retired: use SD_ACCEL=+feature_reuse"),
        (
            {"SD_SMALL_MAP_CONVS": "1"},
            "SD_SMALL_MAP_CONVS was retired: unset it (SD_ACCEL's defaults already",
        ),
        ({"SD_PREFETCH": "0", "SD_ACCEL": "none"}, "SD_PREFETCH was retired: unset it"),
    ],
)
def test_retired_variables_are_refused_naming_their_sd_accel_change(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace("+", r"\+")):
        Settings.from_env(environ)


def test_each_retired_change_is_a_valid_sd_accel() -> None:
    for _, change in RETIRED_VARIABLES.values():
        assert Settings.from_env({"SD_ACCEL": change}).accel == change
    assert Settings.from_env({"SD_PREFETCH": ""}) == Settings()
