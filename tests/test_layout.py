import os
from pathlib import Path

import pytest

from sd_lambda.layout import (
    LayoutError,
    Manifest,
    ModelNotSeededError,
    ModelPaths,
    check_relative_path,
    model_slug,
)


def _release(paths: ModelPaths, revision: str) -> Path:
    release = paths.release(revision)
    (release / "unet").mkdir(parents=True)
    (release / "model_index.json").write_text("{}")
    (release / "unet" / "w.safetensors").write_bytes(b"weights-" + revision.encode())
    return release


def test_slug_of_hub_id() -> None:
    assert model_slug("segmind/tiny-sd") == "segmind--tiny-sd"


@pytest.mark.parametrize("bad", ["", "../etc", "a/../b", ".hidden", "a b", "x" * 200])
def test_slug_rejects_unsafe_names(bad: str) -> None:
    with pytest.raises(LayoutError):
        model_slug(bad)


def test_switch_current_is_relative_and_replaces(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    _release(paths, "r1")
    _release(paths, "r2")
    paths.switch_current("r1")
    assert os.readlink(paths.current) == "releases/r1"
    paths.switch_current("r2")
    assert os.readlink(paths.current) == "releases/r2"
    assert paths.current_revision() == "r2"
    assert paths.resolve_current() == paths.release("r2").resolve()
    assert [p.name for p in paths.model_dir.iterdir() if p.name.startswith(".current")] == []


def test_switch_to_missing_release_leaves_current(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    _release(paths, "r1")
    paths.switch_current("r1")
    with pytest.raises(LayoutError, match="does not exist"):
        paths.switch_current("nope")
    assert paths.current_revision() == "r1"


def test_resolve_current_names_the_expected_path(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    with pytest.raises(ModelNotSeededError, match=str(paths.current)):
        paths.resolve_current()
    paths.releases.mkdir(parents=True)
    (paths.releases / "empty").mkdir()
    paths.switch_current("empty")
    with pytest.raises(ModelNotSeededError, match=r"no model_index\.json"):
        paths.resolve_current()


def test_manifest_roundtrip_and_verification(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    release = _release(paths, "r1")
    manifest = Manifest.build(release, source="test")
    (release / "manifest.json").write_text(manifest.to_json())
    loaded = Manifest.from_json((release / "manifest.json").read_text())
    assert loaded == manifest
    assert {e.path for e in loaded.files} == {"model_index.json", "unet/w.safetensors"}
    assert loaded.problems(release) == []

    (release / "unet" / "w.safetensors").write_bytes(b"weights-XX")
    (release / "extra.bin").write_bytes(b"pickle")
    problems = loaded.problems(release)
    assert "unet/w.safetensors: sha256 mismatch" in problems
    assert "extra.bin: not in manifest" in problems
    assert "extra.bin: pickle weights are refused" in problems


def test_manifest_refuses_symlinks(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "link").symlink_to("/etc/passwd")
    with pytest.raises(LayoutError, match="symlinks"):
        Manifest.build(folder, source="test")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\..\\b", ""])
def test_manifest_paths_must_stay_inside(bad: str) -> None:
    with pytest.raises(LayoutError, match="unsafe path"):
        check_relative_path(bad)


def test_malformed_manifest_is_a_layout_error() -> None:
    with pytest.raises(LayoutError, match="malformed"):
        Manifest.from_json('{"files": [{"path": "a"}]}')
