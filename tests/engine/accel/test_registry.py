"""The acceleration registry's contract: one switch, registry order, stock diffusers with ``none``, and an
acceleration that does not apply is skipped and logged instead of breaking the load."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import diffusers
import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from sd_lambda.engine.accel import registry
from sd_lambda.engine.accel.small_conv import is_routed
from sd_lambda.engine.accel.upsample_fold import FoldedUpsample2D, UpsampleFold
from sd_lambda.engine.torch_engine import Engine, GenerationParams
from sd_lambda.settings import Settings

FP32 = Settings(dtype="float32")
PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def test_the_registry_and_the_switch_import_no_torch() -> None:
    probe = (
        "import json, sys; from sd_lambda.settings import Settings;"
        "selected = Settings.from_env({'SD_ACCEL': 'all'}).accelerations;"
        "print(json.dumps([selected, 'torch' in sys.modules, 'diffusers' in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    selected, torch_imported, diffusers_imported = json.loads(done.stdout)
    assert selected == list(registry.SAME_IMAGE)
    assert (torch_imported, diffusers_imported) == (False, False)


def test_entries_are_in_stage_order_and_each_names_its_implementation() -> None:
    stages = [registry.STAGES.index(a.stage) for a in registry.ACCELERATIONS]
    assert stages == sorted(stages)  # so applying stage by stage is applying in registry order
    assert len(registry.BY_NAME) == len(registry.ACCELERATIONS)
    for acceleration in registry.ACCELERATIONS:
        implementation = acceleration.implementation()
        assert callable(implementation.check), acceleration.name
        assert callable(implementation.apply), acceleration.name
        assert acceleration.summary
    assert "feature_reuse" not in registry.DEFAULTS
    assert "feature_reuse" not in registry.SAME_IMAGE


@pytest.mark.parametrize("value", ["fastest", "in_place,warp", "+nothing", ","])
def test_an_unknown_name_is_refused_naming_the_known_ones(value: str) -> None:
    with pytest.raises(ValueError, match="known: prefetch, heap_keep, bf16_copy") as raised:
        registry.resolve(value)
    assert "SD_ACCEL" in str(raised.value)


@pytest.mark.parametrize("value", ["--in_place", "-+in_place", "+-in_place", "++feature_reuse"])
def test_a_change_with_more_than_one_sign_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="more than one sign") as raised:
        registry.resolve(value)
    assert value in str(raised.value)


@pytest.mark.parametrize("value", ["-feature_reuse", "-in_place,-guidance_prefix"])
def test_removing_an_acceleration_the_defaults_do_not_select_is_refused(value: str) -> None:
    unselected = value.split(",")[-1]
    with pytest.raises(ValueError, match=f"{unselected} removes what the defaults do not select"):
        registry.resolve(value)


def test_all_is_every_acceleration_that_keeps_the_image() -> None:
    changing = [a.name for a in registry.ACCELERATIONS if a.changes_image]
    assert changing == ["feature_reuse"]
    assert registry.resolve("all") == registry.SAME_IMAGE
    assert "feature_reuse" not in registry.resolve("all")
    assert "not feature_reuse" in registry.SWITCH_HELP  # the switch's help says so
    assert "feature_reuse" in registry.resolve("+feature_reuse")  # by name only
    assert registry.resolve("-in_place") == tuple(n for n in registry.DEFAULTS if n != "in_place")


def test_none_loads_stock_diffusers_modules_with_no_hooks(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, replace(FP32, accel="none"))
    assert engine.choices.accelerations == {}
    assert engine.describe()["accelerations"] == []
    modules = [
        module
        for component in (engine.pipeline.text_encoder, engine.pipeline.unet, engine.pipeline.vae)
        for module in component.modules()
    ]
    modules += list(engine.tiny_decoder.modules())
    assert not [m for m in modules if type(m).__module__.startswith("sd_lambda")]
    assert not [m for m in modules if hasattr(m, "_diffusers_hook")]
    assert not [m for m in modules if "forward" in vars(m)]
    assert engine.pipeline.vae.encoder is not None  # not even the encoder dropped
    assert engine.pipeline.vae.decoder.conv_in.weight.is_contiguous()  # NCHW, as loaded
    params = GenerationParams(
        prompt="a fox", num_inference_steps=2, guidance_scale=7.5, width=64, height=64, seed=1
    )
    assert engine.generate(params).images[0].size == (64, 64)


def test_engine_load_applies_the_selection_in_registry_order(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied: list[str] = []
    apply = registry.Acceleration.apply

    def recording(self: registry.Acceleration, target: registry.Target) -> str:
        applied.append(self.name)
        return apply(self, target)

    monkeypatch.setattr(registry.Acceleration, "apply", recording)
    # Listed backwards: the order is the registry's, not the switch's.
    selection = ",".join(reversed(registry.SAME_IMAGE))
    engine = Engine.load(tiny_model_dir, replace(FP32, accel=selection))
    assert applied == list(engine.choices.accelerations)
    assert applied == [name for name in registry.BY_NAME if name in applied]
    assert len(applied) >= 8


def test_an_acceleration_that_does_not_apply_is_skipped_and_logged(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(UpsampleFold, "check", staticmethod(lambda target: "no foldable upsampler here"))
    with caplog.at_level(logging.INFO, logger="sd_lambda.engine.torch_engine"):
        engine = Engine.load(tiny_model_dir, replace(FP32, accel="all"))
    assert engine.choices.skipped_accelerations["upsample_fold"] == "no foldable upsampler here"
    assert "upsample_fold" not in engine.choices.accelerations
    assert "in_place" in engine.choices.accelerations  # the others still apply
    assert not any(isinstance(m, FoldedUpsample2D) for m in engine.pipeline.unet.modules())
    assert "engine acceleration upsample_fold skipped: no foldable upsampler here" in caplog.text
    assert engine.describe()["skipped_accelerations"]["upsample_fold"] == "no foldable upsampler here"


def test_a_component_an_acceleration_does_not_support_stays_stock(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, replace(FP32, accel="all"))
    assert engine.choices.skipped_accelerations["bf16_copy"].startswith("runs float32")
    bf16 = Engine.load(tiny_model_dir, Settings(dtype="bfloat16", accel="all"))
    assert "fp32" in bf16.choices.skipped_accelerations["small_map_convs"]
    assert not any(is_routed(m) for m in bf16.pipeline.unet.modules())
    assert bf16.pipeline.unet.dtype == torch.bfloat16


def test_outside_its_tested_diffusers_range_an_acceleration_is_skipped(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diffusers, "__version__", "9.0.0")
    engine = Engine.load(tiny_model_dir, replace(FP32, accel="default"))
    reason = f"tested on diffusers {registry.TESTED_DIFFUSERS}, not 9.0.0"
    assert engine.choices.skipped_accelerations["upsample_fold"] == reason
    assert engine.choices.skipped_accelerations["in_place"] == reason
    # The ones that do not touch diffusers modules still apply.
    assert {"channels_last", "page_release"} <= set(engine.choices.accelerations)
    assert not any(hasattr(m, "_diffusers_hook") for m in engine.pipeline.unet.modules())


def test_the_runtime_extra_installs_only_diffusers_releases_the_registry_is_tested_on() -> None:
    """A later diffusers would install cleanly and then skip every acceleration that touches it."""
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["runtime"]
    (allowed,) = [Requirement(line).specifier for line in extras if Requirement(line).name == "diffusers"]
    tested = SpecifierSet(registry.TESTED_DIFFUSERS)
    releases = [
        f"{major}.{minor}.{patch}" for major in (0, 1, 2) for minor in range(100) for patch in range(4)
    ]
    installable = [version for version in releases if allowed.contains(version)]
    assert installable, f"no release satisfies diffusers{allowed}"
    assert [version for version in installable if not tested.contains(version)] == []
