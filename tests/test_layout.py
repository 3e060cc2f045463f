import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from sd_lambda import layout
from sd_lambda.layout import (
    LayoutError,
    Manifest,
    ModelNotSeededError,
    ModelPaths,
    WeightsName,
    bf16_copy_path,
    check_name,
    check_relative_path,
    find_pickle_weights,
    fix_ownership,
    install_release,
    model_slug,
    parse_weights_name,
    prune_releases,
    publish_release,
    single_weights_name,
    write_file_atomically,
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


# --- names, paths and the manifest schema (#21 item 12) --------------------------------------------


@pytest.mark.parametrize("bad", ["v2\n", "acme--tiny-sd\n", "r1\r\n", "r1\x00"])
def test_names_with_a_trailing_newline_or_control_character_are_refused(bad: str) -> None:
    with pytest.raises(LayoutError, match="invalid revision"):
        check_name(bad, "revision")
    with pytest.raises(LayoutError):
        ModelPaths(Path("/models/m")).release(bad)


@pytest.mark.parametrize("bad", ["unet/a\x00b.safetensors", "unet/a\nb", "model_index.json\n", "a\x7f"])
def test_manifest_paths_with_control_characters_are_refused(bad: str) -> None:
    with pytest.raises(LayoutError, match="unsafe path in manifest"):
        check_relative_path(bad)


def _manifest_json(*entries: dict[str, object]) -> str:
    files = [{"path": "model_index.json", "size": 2, "sha256": "a" * 64}, *entries]
    return json.dumps({"files": files, "source": "test", "created_at": "2026-01-01T00:00:00+00:00"})


def test_a_manifest_that_is_not_utf8_is_a_layout_error() -> None:
    raw = _manifest_json({"path": "unet/w.safetensors", "size": 1, "sha256": "b" * 64}).encode()
    assert Manifest.from_json(raw).files[1].path == "unet/w.safetensors"
    with pytest.raises(LayoutError, match="malformed manifest: 'utf-8' codec can't decode"):
        Manifest.from_json(raw.replace(b"unet/w", b"unet/\xff"))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"path": "u/w", "size": 1, "sha256": "b" * 63}, "is not 64 lowercase hex digits"),
        ({"path": "u/w", "size": 1, "sha256": "B" * 64}, "is not 64 lowercase hex digits"),
        ({"path": "u/w", "size": 1, "sha256": None}, "is not 64 lowercase hex digits"),
        ({"path": "u/w", "size": -1, "sha256": "b" * 64}, "is not a whole number of bytes"),
        ({"path": "u/w", "size": "12", "sha256": "b" * 64}, "is not a whole number of bytes"),
        ({"path": "u/w", "size": 1.5, "sha256": "b" * 64}, "is not a whole number of bytes"),
        ({"path": "u/w", "size": True, "sha256": "b" * 64}, "is not a whole number of bytes"),
        ({"path": 7, "size": 1, "sha256": "b" * 64}, "is not a string"),
        ({"path": "model_index.json", "size": 2, "sha256": "a" * 64}, "listed twice"),
        ({"path": "model_index.json/x", "size": 2, "sha256": "a" * 64}, "listed as a file and is a folder"),
        ({"path": "manifest.json", "size": 2, "sha256": "a" * 64}, "listed as a file and is a folder or the"),
    ],
)
def test_manifest_schema_is_checked_when_parsed(entry: dict[str, object], message: str) -> None:
    with pytest.raises(LayoutError, match=re.escape(message)):
        Manifest.from_json(_manifest_json(entry))


def test_atomic_write_never_writes_through_a_hard_link(tmp_path: Path) -> None:
    live = tmp_path / "live.json"
    live.write_bytes(b"the live release's manifest")
    staged = tmp_path / "staged.json"
    os.link(live, staged)  # what `cp -al releases/r1 .staging-r2` leaves

    write_file_atomically(staged, b"the new manifest")

    assert live.read_bytes() == b"the live release's manifest"
    assert staged.read_bytes() == b"the new manifest"
    assert os.stat(live).st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.json", "staged.json"]  # no temp left


# --- the layout's promises, each pinned against a one-line change (#21 item 20) ----------------------


def test_current_never_stops_existing_while_it_is_switched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After every file system call of a switch, a reader still finds ``current`` and a release behind it
    (unlink + rename, or ``ln -sfn``, would leave a moment without it)."""
    paths = ModelPaths(tmp_path / "m")
    for revision in ("r1", "r2"):
        _release(paths, revision)
    paths.switch_current("r1")
    seen: list[tuple[str, str | None]] = []

    def watched(name: str) -> None:
        real = getattr(os, name)

        def call(*args: object, **kwargs: object) -> object:
            result = real(*args, **kwargs)
            target = os.readlink(paths.current) if os.path.islink(paths.current) else None
            seen.append((name, target))
            return result

        monkeypatch.setattr(os, name, call)

    for name in ("unlink", "remove", "rename", "replace", "symlink", "rmdir"):
        watched(name)
    paths.switch_current("r2")
    paths.switch_current("r1")
    monkeypatch.undo()

    assert seen, "the switch made no file system call this test watches"
    assert all(target in {"releases/r1", "releases/r2"} for _, target in seen), seen
    assert ("replace", "releases/r2") in seen  # one rename over the old link is the switch itself
    assert os.readlink(paths.current) == "releases/r1"


def test_prune_never_removes_the_current_release(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    for age, revision in enumerate(("r1", "r2", "r3")):
        os.utime(_release(paths, revision), (1_000 + age, 1_000 + age))
    paths.switch_current("r1")  # rolled back to the oldest

    with paths.locked() as lock:
        pruned = prune_releases(paths, 1, lock)

    assert pruned == ("r2",)
    assert paths.revisions() == ["r1", "r3"]
    assert paths.current_revision() == "r1"


def test_prune_never_leaves_a_half_deleted_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = ModelPaths(tmp_path / "m")
    for age, revision in enumerate(("r1", "r2")):
        os.utime(_release(paths, revision), (1_000 + age, 1_000 + age))
    paths.switch_current("r2")

    def dies_half_way(path: object) -> None:
        (Path(str(path)) / "model_index.json").unlink()
        raise OSError("killed half-way")

    monkeypatch.setattr(layout.shutil, "rmtree", dies_half_way)
    with paths.locked() as lock, pytest.raises(OSError, match="killed half-way"):
        prune_releases(paths, 1, lock)

    assert paths.revisions() == ["r2"]  # the half-deleted r1 is out of releases/, under .trash-*
    assert [
        p.name.startswith(".trash-r1-") for p in paths.model_dir.iterdir() if p.name.startswith(".t")
    ] == [True]


def test_a_published_release_is_the_newest_whatever_its_staging_age(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    source = tmp_path / "source"
    (source / "unet").mkdir(parents=True)
    (source / "model_index.json").write_text("{}")
    for age, revision in enumerate(("r1", "r2")):
        (source / "unet" / "w.safetensors").write_bytes(revision.encode())
        install_release(paths, revision, source)
        os.utime(paths.release(revision), (2_000 + age, 2_000 + age))
    (source / "unet" / "w.safetensors").write_bytes(b"r3")
    staging = paths.staging("r3")
    shutil.copytree(source, staging)
    (staging / "manifest.json").write_text(Manifest.build(staging, source="test").to_json())
    os.utime(staging, (1_000, 1_000))  # staged long ago (an interrupted run resumed today)

    with paths.locked() as lock:
        result = publish_release(paths, "r3", lock, keep=2)

    assert paths.revisions() == ["r2", "r3"]
    assert result.pruned == ("r1",)


def test_ownership_is_given_to_the_access_points_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = ModelPaths(tmp_path / "m")
    release = _release(paths, "r1")
    chowned: dict[str, tuple[int, int]] = {}

    def chown(path: object, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        assert follow_symlinks is False
        chowned[os.path.relpath(str(path), release)] = (uid, gid)

    monkeypatch.setattr(layout.os, "chown", chown)
    fix_ownership(release, (1000, 1000))

    assert chowned == {".": (1000, 1000), "unet": (1000, 1000), "model_index.json": (1000, 1000),
                       "unet/w.safetensors": (1000, 1000)}  # fmt: skip
    assert stat.S_IMODE(os.stat(release / "unet" / "w.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(release / "unet").st_mode) == 0o755


def test_pickle_weights_are_found_whatever_the_case_of_their_suffix(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    for name in ("a.BIN", "b.Ckpt", "c.pt", "d.safetensors"):
        (tmp_path / "unet" / name).write_bytes(b"x")
    assert find_pickle_weights(tmp_path) == ["unet/a.BIN", "unet/b.Ckpt", "unet/c.pt"]


def test_a_release_already_there_is_verified_before_the_switch(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    source = tmp_path / "source"
    (source / "unet").mkdir(parents=True)
    (source / "model_index.json").write_text("{}")
    for revision in ("r1", "r2"):
        (source / "unet" / "w.safetensors").write_bytes(b"weights-" + revision.encode())
        install_release(paths, revision, source)
    (paths.release("r1") / "unet" / "w.safetensors").write_bytes(b"weights-XX")  # same size: bit rot

    with paths.locked() as lock, pytest.raises(LayoutError, match="sha256 mismatch"):
        publish_release(paths, "r1", lock)

    assert paths.current_revision() == "r2"
