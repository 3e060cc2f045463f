"""``sd-lambda demo`` / ``serve`` and their model folders."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
from helpers import TEST_MODEL_NAME
from PIL import Image

from sd_lambda.cli import FROM_MAKE_ENV, main
from sd_lambda.devtools.local.models import DEMO_MODEL, ModelDirError, as_efs_layout, ensure_demo_model
from sd_lambda.layout import Manifest, ModelPaths


def test_a_plain_diffusers_folder_is_wrapped_not_copied(tiny_model_dir: Path, tmp_path: Path) -> None:
    paths = as_efs_layout(tiny_model_dir, tmp_path / "cache")
    assert not os.readlink(paths.current).startswith("/")  # relative, as the layout contract says
    assert paths.resolve_current() == tiny_model_dir.resolve()
    assert paths.model_dir.is_relative_to(tmp_path / "cache")
    assert as_efs_layout(tiny_model_dir, tmp_path / "cache") == paths  # idempotent


def test_an_efs_layout_folder_is_used_as_it_is(module_model_root: Path, tmp_path: Path) -> None:
    paths = as_efs_layout(module_model_root / TEST_MODEL_NAME, tmp_path / "cache")
    assert paths.model_dir == module_model_root / TEST_MODEL_NAME
    assert not (tmp_path / "cache").exists()


def test_any_other_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ModelDirError, match="neither a diffusers folder"):
        as_efs_layout(tmp_path, tmp_path / "cache")
    assert main(["serve", "--model-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("sd-lambda serve: error:")
    assert "\n" not in error


def test_serve_on_a_busy_port_is_a_one_line_error(
    module_model_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert (
            main(["serve", "--model-dir", str(module_model_root / TEST_MODEL_NAME), "--port", str(port)]) == 1
        )
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_demo_model_is_built_once_in_the_efs_layout(tmp_path: Path) -> None:
    paths = ensure_demo_model(tmp_path)
    assert paths.model_dir == tmp_path / "demo-models" / DEMO_MODEL
    release = paths.resolve_current()
    assert Manifest.from_json((release / "manifest.json").read_text()).problems(release) == []
    stamp = (release / "model_index.json").stat().st_mtime_ns
    assert ensure_demo_model(tmp_path) == paths
    assert (release / "model_index.json").stat().st_mtime_ns == stamp
    assert ModelPaths(paths.model_dir).revisions() == [release.name]


def test_demo_runs_the_real_entrypoint_and_writes_the_image(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.png"
    args = ["demo", "--model-dir", str(tiny_model_dir), "--cache-dir", str(tmp_path), "--output", str(out)]
    assert main([*args, "--steps", "1", "--seed", "9"]) == 0
    printed = capsys.readouterr().out
    assert "cold" in printed
    assert "warm" in printed
    assert "load;dur=0.0" in printed  # the warm request did not load again
    assert "loading   the model with the first request" in printed
    assert re.search(r"^loaded    the model in \d+\.\d s$", printed, re.MULTILINE)
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    assert '"seed": 9' in printed
    assert (tmp_path / "demo-lambda.log").read_text().count('"outcome":"ok"') == 2
    assert "RANDOM weights" not in printed  # a real folder: no word about noise


def test_demo_of_the_test_model_says_its_picture_is_noise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.png"
    assert main(["demo", "--cache-dir", str(tmp_path), "-o", str(out), "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "the test model has RANDOM weights: its picture is noise" in printed
    assert "hf download segmind/tiny-sd" in printed
    assert "sd-lambda demo --model-dir models/tiny-sd" in printed
    assert out.is_file()


def test_the_demo_note_names_the_make_variable_under_make(monkeypatch: pytest.MonkeyPatch) -> None:
    from sd_lambda.devtools.local.cli import random_weights_note

    monkeypatch.setenv(FROM_MAKE_ENV, "1")
    assert random_weights_note()[-1].strip() == "make demo MODEL_DIR=models/tiny-sd"
    monkeypatch.delenv(FROM_MAKE_ENV)
    assert random_weights_note()[-1].strip() == "sd-lambda demo --model-dir models/tiny-sd"


def test_serve_reports_a_model_load_from_the_response_timings() -> None:
    from sd_lambda.devtools.local.cli import load_seconds
    from sd_lambda.devtools.local.runtime import InvocationResult

    def result(timing: str) -> InvocationResult:
        payload = {"statusCode": 200, "headers": {"server-timing": timing}, "body": ""}
        return InvocationResult("r-1", json.dumps(payload).encode())

    assert load_seconds(result("load;dur=1520.0, inference;dur=80")) == 1.52
    assert load_seconds(result("load;dur=0.0, inference;dur=80")) is None  # warm: nothing loaded
    assert load_seconds(InvocationResult("r-2", error_type="Runtime.ExitError")) is None


def test_a_folder_name_that_cannot_be_a_revision_is_a_clear_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    alias = tmp_path / "My Model"
    alias.symlink_to(tiny_model_dir, target_is_directory=True)
    with pytest.raises(ModelDirError, match="invalid model name 'My Model'"):
        as_efs_layout(alias, tmp_path / "cache")
