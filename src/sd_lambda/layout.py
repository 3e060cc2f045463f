"""The model layout on EFS: the one contract between seeding (writer) and serving (reader).

See ``shared/design/efs-model-layout.md``::

    <name>/
      releases/<revision>/        complete diffusers folder + manifest.json
      current -> releases/<rev>   relative symlink, switched atomically
      .staging-<revision>/        work in progress
      .lock                       held while a seeding run is active

Standard library only: this module also runs on the seeder instance, shipped verbatim.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

CURRENT = "current"
RELEASES = "releases"
STAGING_PREFIX = ".staging-"
LOCK = ".lock"
MANIFEST = "manifest.json"
# Weights in these formats can execute code when loaded; only safetensors are served.
PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LayoutError(Exception):
    """A model folder does not follow the layout contract."""


class ModelNotSeededError(LayoutError):
    """There is no complete revision behind ``current``."""


def model_slug(hub_id: str) -> str:
    """``segmind/tiny-sd`` -> ``segmind--tiny-sd``: one safe folder name per hub id."""
    slug = hub_id.strip().replace("/", "--")
    check_name(slug, "model name")
    return slug


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value) or ".." in value:
        raise LayoutError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-' (at most 128, no '..')"
        )
    return value


def check_relative_path(path: str) -> PurePosixPath:
    """A manifest path must stay inside its folder: no absolute paths, no '..', no empty parts."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or "\\" in path or any(part in ("", ".", "..") for part in pure.parts):
        raise LayoutError(f"unsafe path in manifest: {path!r}")
    if pure.parts != tuple(path.split("/")):
        raise LayoutError(f"unsafe path in manifest: {path!r}")
    return pure


@dataclass(frozen=True)
class ModelPaths:
    """Where each part of one model's layout lives, under ``<root>/<name>``."""

    model_dir: Path

    @property
    def releases(self) -> Path:
        return self.model_dir / RELEASES

    @property
    def current(self) -> Path:
        return self.model_dir / CURRENT

    @property
    def lock(self) -> Path:
        return self.model_dir / LOCK

    def release(self, revision: str) -> Path:
        return self.releases / check_name(revision, "revision")

    def staging(self, revision: str) -> Path:
        return self.model_dir / f"{STAGING_PREFIX}{check_name(revision, 'revision')}"

    def revisions(self) -> list[str]:
        """Release folders, oldest first (by modification time, then name)."""
        if not self.releases.is_dir():
            return []
        entries = [p for p in self.releases.iterdir() if p.is_dir() and not p.is_symlink()]
        return [p.name for p in sorted(entries, key=lambda p: (p.stat().st_mtime, p.name))]

    def current_revision(self) -> str | None:
        try:
            target = os.readlink(self.current)
        except (FileNotFoundError, OSError):
            return None
        return PurePosixPath(target).name

    def resolve_current(self) -> Path:
        """The release folder ``current`` points at; raises ModelNotSeededError naming what is missing."""
        if not self.current.is_symlink():
            raise ModelNotSeededError(
                f"model not seeded: expected a symlink {self.current} -> {RELEASES}/<revision>"
            )
        target = self.current.resolve()
        if not (target / "model_index.json").is_file():
            raise ModelNotSeededError(
                f"model incomplete: {self.current} points at {target}, which has no model_index.json"
            )
        return target

    def switch_current(self, revision: str) -> None:
        """Point ``current`` at ``releases/<revision>`` atomically (symlink + rename, like ``mv -T``)."""
        release = self.release(revision)
        if not release.is_dir():
            raise LayoutError(f"cannot switch to {revision!r}: {release} does not exist")
        temporary = self.model_dir / f".{CURRENT}-{os.getpid()}"
        temporary.unlink(missing_ok=True)
        # Relative target: the seeder and the Lambda mount the same data at different paths.
        os.symlink(f"{RELEASES}/{revision}", temporary)
        os.replace(temporary, self.current)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def find_pickle_weights(folder: Path) -> list[str]:
    """Relative paths of files whose format can run code when loaded."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
    )


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[ManifestEntry, ...]
    source: str
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @classmethod
    def build(cls, folder: Path, source: str) -> Manifest:
        """Describe every regular file under ``folder`` (but the manifest itself); symlinks are refused."""
        entries = []
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink():
                raise LayoutError(f"symlinks are not allowed in a model folder: {relative}")
            if path.is_file() and relative != MANIFEST:
                entries.append(ManifestEntry(relative, path.stat().st_size, sha256_file(path)))
        return cls(files=tuple(entries), source=source)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
            entries = tuple(
                ManifestEntry(str(e["path"]), int(e["size"]), str(e["sha256"])) for e in data["files"]
            )
            manifest = cls(files=entries, source=str(data["source"]), created_at=str(data["created_at"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise LayoutError(f"malformed manifest: {exc}") from exc
        for entry in manifest.files:
            check_relative_path(entry.path)
        return manifest

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def problems(self, folder: Path) -> list[str]:
        """Every way ``folder`` differs from this manifest (missing, size, sha256, extra, pickle)."""
        found: list[str] = []
        listed = set()
        for entry in self.files:
            listed.add(entry.path)
            path = folder / check_relative_path(entry.path)
            if path.is_symlink() or not path.is_file():
                found.append(f"{entry.path}: missing")
            elif path.stat().st_size != entry.size:
                found.append(f"{entry.path}: size {path.stat().st_size} != {entry.size}")
            elif sha256_file(path) != entry.sha256:
                found.append(f"{entry.path}: sha256 mismatch")
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            if (path.is_file() or path.is_symlink()) and relative not in listed and relative != MANIFEST:
                found.append(f"{relative}: not in manifest")
        found.extend(f"{p}: pickle weights are refused" for p in find_pickle_weights(folder))
        return found
