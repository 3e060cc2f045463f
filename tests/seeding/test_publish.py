"""layout.py's writer side, in process: lock, publish, activate, prune, ownership, safe paths."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sd_lambda.layout import (
    LayoutError,
    LockBusyError,
    ModelPaths,
    activate_release,
    fix_ownership,
    install_release,
    prune_releases,
    publish_release,
    safe_join,
    verify_release,
)

from .conftest import make_model


def test_install_release_publishes_through_staging(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "efs" / "m")
    result = install_release(paths, "r1", make_model(tmp_path / "v1", "v1"))
    assert (result.revision, result.previous, result.reused) == ("r1", None, False)
    assert os.readlink(paths.current) == "releases/r1"
    assert not paths.staging("r1").exists()
    verify_release(paths.release("r1"))
    again = install_release(paths, "r1", make_model(tmp_path / "same", "v1"))
    assert again.reused is True
    with pytest.raises(LayoutError, match="already exists with different content"):
        install_release(paths, "r1", make_model(tmp_path / "other", "v2"))
    assert paths.current_revision() == "r1"


def test_failed_verification_leaves_current(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    install_release(paths, "r1", make_model(tmp_path / "v1", "v1"))
    bad = make_model(tmp_path / "bad", "v2")
    (bad / "model_index.json").unlink()
    with pytest.raises(LayoutError, match=r"model_index\.json: missing \(not a diffusers pipeline\)"):
        install_release(paths, "r2", bad)
    assert paths.current_revision() == "r1"
    assert paths.revisions() == ["r1"]


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    with paths.locked() as lock:
        with pytest.raises(LockBusyError, match=f"pid {os.getpid()}"), paths.locked():
            pass
        waits: list[int] = []
        with pytest.raises(LockBusyError), paths.locked(timeout=0.05, on_wait=lambda: waits.append(1)):
            pass
        assert waits == [1]
        assert lock.model_dir == paths.model_dir
    with paths.locked():
        pass  # released when the block exits


def test_lock_must_match_the_model(tmp_path: Path) -> None:
    one, other = ModelPaths(tmp_path / "one"), ModelPaths(tmp_path / "other")
    install_release(one, "r1", make_model(tmp_path / "v1", "v1"))
    with other.locked() as lock, pytest.raises(LayoutError, match="the lock held is for"):
        activate_release(one, "r1", lock)


def test_prune_never_removes_current(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    for index in range(1, 5):
        install_release(paths, f"r{index}", make_model(tmp_path / f"v{index}", f"v{index}"), keep=10)
    with paths.locked() as lock:
        activate_release(paths, "r1", lock)
        assert prune_releases(paths, 1, lock) == ("r2", "r3")
        assert paths.revisions() == ["r1", "r4"]
        with pytest.raises(LayoutError, match="keep must be at least 1"):
            prune_releases(paths, 0, lock)
    assert paths.current_revision() == "r1"


def test_publish_fixes_ownership_and_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = ModelPaths(tmp_path / "m")
    staging = paths.staging("r1")
    shutil.copytree(make_model(tmp_path / "v1", "v1"), staging)
    (staging / "unet" / "part0.safetensors").chmod(0o600)
    from sd_lambda.layout import MANIFEST, Manifest

    (staging / MANIFEST).write_text(Manifest.build(staging, source="t").to_json())
    chowned: list[tuple[str, int, int]] = []
    monkeypatch.setattr(os, "chown", lambda path, uid, gid, **_: chowned.append((str(path), uid, gid)))
    with paths.locked() as lock:
        publish_release(paths, "r1", lock, owner=(1000, 1000))
    release = paths.release("r1")
    expected = {str(release)} | {str(p) for p in release.rglob("*")}
    assert {path for path, _, _ in chowned} >= expected
    assert {(uid, gid) for _, uid, gid in chowned} == {(1000, 1000)}
    assert oct((release / "unet" / "part0.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((release / "unet").stat().st_mode & 0o777) == oct(0o755)


def test_fix_ownership_refuses_symlinks(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "v1", "v1")
    (folder / "link").symlink_to("/etc/passwd")
    with pytest.raises(LayoutError, match="through a symlink"):
        fix_ownership(folder, (os.getuid(), os.getgid()))


def test_verify_release_catches_symlinked_folders(tmp_path: Path) -> None:
    paths = ModelPaths(tmp_path / "m")
    install_release(paths, "r1", make_model(tmp_path / "v1", "v1"))
    release = paths.release("r1")
    outside = tmp_path / "outside"
    shutil.move(release / "unet", outside)
    (release / "unet").symlink_to(outside)  # same bytes, but living outside the release
    with pytest.raises(LayoutError, match="unet: symlinks are refused"):
        verify_release(release)


def test_safe_join(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert safe_join(root, "unet/config.json") == root / "unet" / "config.json"
    assert (root / "unet").is_dir()
    (root / "vae").symlink_to(tmp_path)
    with pytest.raises(LayoutError, match="not a plain directory"):
        safe_join(root, "vae/x.safetensors")
    (root / "unet" / "w.safetensors").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LayoutError, match="is a symlink"):
        safe_join(root, "unet/w.safetensors")
    with pytest.raises(LayoutError, match="unsafe path"):
        safe_join(root, "../x")
