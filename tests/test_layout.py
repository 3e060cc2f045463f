import os
from pathlib import Path

import pytest

from sd_lambda.layout import (
    LayoutError,
    Manifest,
    ModelNotSeededError,
    ModelPaths,
    WeightsName,
    bf16_copy_path,
    check_relative_path,
    model_slug,
    parse_weights_name,
    single_weights_name,
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


@pytest.mark.parametrize(
    ("name", "parsed", "plain"),
    [
        ("diffusion_pytorch_model.safetensors", WeightsName("diffusion_pytorch_model"), None),
        ("model.fp16.safetensors", WeightsName("model", variant="fp16"), "model.safetensors"),
        ("model.non_ema.safetensors", WeightsName("model", variant="non_ema"), "model.safetensors"),
        ("model-00001-of-00002.safetensors", WeightsName("model", "-00001-of-00002"), None),
        # diffusers' and transformers' current spelling of a variant's shard, and the legacy one
        (
            "model.fp16-00002-of-00002.safetensors",
            WeightsName("model", "-00002-of-00002", "fp16"),
            "model-00002-of-00002.safetensors",
        ),
        (
            "model-00002-of-00002.fp16.safetensors",
            WeightsName("model", "-00002-of-00002", "fp16"),
            "model-00002-of-00002.safetensors",
        ),
        ("model.safetensors.index.json", WeightsName("model", index=True), None),
        (
            "model.safetensors.index.fp16.json",
            WeightsName("model", variant="fp16", index=True),
            "model.safetensors.index.json",
        ),
        (
            "model.safetensors.fp16.index.json",
            WeightsName("model", variant="fp16", index=True),
            "model.safetensors.index.json",
        ),
    ],
)
def test_parse_weights_name(name: str, parsed: WeightsName, plain: str | None) -> None:
    assert parse_weights_name(name) == parsed
    assert parsed.plain_name == (plain or name)
    assert parsed.sharded == ("-of-" in name or ".index." in name)


@pytest.mark.parametrize(
    "name", ["config.json", "diffusion_pytorch_model.bin", "model.a.b.safetensors", "model.safetensors.json"]
)
def test_parse_weights_name_ignores_other_files(name: str) -> None:
    assert parse_weights_name(name) is None


@pytest.mark.parametrize(
    ("names", "single"),
    [
        (["config.json", "model.safetensors", "model.fp16.safetensors"], "model.safetensors"),
        (["model.fp16.safetensors"], None),
        (["model.safetensors", "other.safetensors"], None),
        (["model.safetensors", "model.fp16-00001-of-00002.safetensors"], None),  # a sharded variant
        (["model.safetensors", "model.safetensors.index.fp16.json"], None),
    ],
)
def test_single_weights_name(names: list[str], single: str | None) -> None:
    assert single_weights_name(names) == single


def test_bf16_copy_path_takes_only_unsharded_stored_weights() -> None:
    assert bf16_copy_path(Path("unet/model.safetensors")) == Path("unet/model.bf16.safetensors")
    for name in ("model.fp16.safetensors", "model-00001-of-00002.safetensors", "config.json"):
        with pytest.raises(ValueError, match="is not an unsharded stored weights file"):
            bf16_copy_path(Path(name))
