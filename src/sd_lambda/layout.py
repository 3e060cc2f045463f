"""The model layout on EFS: the one contract between seeding (writer) and serving (reader).

docs/seeding.md and docs/architecture.md (Seeding) describe it for operators::

    <name>/
      releases/<revision>/        complete diffusers folder + manifest.json
      current -> releases/<rev>   relative symlink, switched atomically
      .staging-<revision>/        work in progress
      .lock                       held while a seeding run is active
      loras/<adapter>/            a LoRA adapter for this model: the same layout (releases/<revision>
                                  holding one <weights>.safetensors + manifest.json, current, .lock)

Standard library only, and Python 3.9 compatible: this module also runs on the seeder instance
(Amazon Linux 2023's python3), shipped verbatim inside the on-instance sync program.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePath, PurePosixPath
from typing import TypeVar

CURRENT = "current"
RELEASES = "releases"
STAGING_PREFIX = ".staging-"
LOCK = ".lock"
MANIFEST = "manifest.json"
MODEL_INDEX = "model_index.json"
# A model's LoRA adapters live in <name>/loras/<adapter>/, each with the model's release layout.
LORAS = "loras"
# The kinds of release the layout holds: a diffusers pipeline, or a LoRA adapter for one.
MODEL, LORA = "model", "lora"
# Optional TAESD-style decoder inside a release (the engine's "tiny" decoder).
TINY_DECODER_FOLDER = "vae_tiny"
# Releases kept by pruning (the current one is never pruned): the grace period for warm Lambdas.
DEFAULT_KEEP = 3
# The access point's POSIX user: everything the Lambda reads must be readable by it.
LAMBDA_OWNER = (1000, 1000)
# Weights in these formats can execute code when loaded; only safetensors and OpenVINO IR are served.
PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})
# OpenVINO IR, as optimum-intel exports a pipeline: <component>/openvino_model.xml (the graph) beside
# openvino_model.bin, its weights as raw tensor data that OpenVINO maps and never unpickles. A .bin is
# IR weights only beside an .xml of the same stem; any other .bin (pytorch_model.bin) is a pickle.
OPENVINO_GRAPH_SUFFIX = ".xml"
# A release holding this is an OpenVINO one: the engine serves it with OpenVINO (sd_lambda.engine.backend).
OPENVINO_UNET = "unet/openvino_model.xml"
ENGINES = ("torch", "openvino")
# An optional bf16 copy of the weights beside the stored ones, in diffusers' variant naming
# (<stem>.bf16.safetensors): a host with native bf16 maps it as stored instead of casting at load.
BF16_VARIANT = "bf16"
# The components a copy covers: the pipeline's big ones (the tiny decoder is 10 MB, cast at load).
BF16_COPY_COMPONENTS = ("text_encoder", "unet", "vae")

_AnyPath = TypeVar("_AnyPath", bound=PurePath)
# diffusers' and transformers' names for a component's safetensors, as diffusers' loader matches them
# (diffusers.pipelines.pipeline_loading_utils.variant_compatible_siblings), tried in this order:
# "-00001-of-00002.fp16" must be read as a legacy variant shard, not as a variant named after a shard.
# Each entry: pattern, is a shard index, is a legacy spelling.
_SHARD = r"(?P<shard>-\d{5}-of-\d{5})"
_WEIGHTS_NAMES = tuple(
    (re.compile(pattern), index, legacy)
    for pattern, index, legacy in (
        (rf"(?P<stem>[^.]+?){_SHARD}\.(?P<variant>[^.]+)\.safetensors", False, True),
        (rf"(?P<stem>[^.]+?){_SHARD}?\.safetensors", False, False),  # stored weights or a shard of them
        (rf"(?P<stem>[^.]+)\.(?P<variant>[^.]+?){_SHARD}?\.safetensors", False, False),  # a variant (shard)
        (r"(?P<stem>[^.]+)\.safetensors\.index\.json", True, False),
        (r"(?P<stem>[^.]+)\.safetensors\.index\.(?P<variant>[^.]+)\.json", True, False),
        (r"(?P<stem>[^.]+)\.safetensors\.(?P<variant>[^.]+)\.index\.json", True, True),
    )
)
# Matched with fullmatch: "$" would also accept a name that ends in a newline ("v2\n").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class LayoutError(Exception):
    """A model folder does not follow the layout contract."""


class ModelNotSeededError(LayoutError):
    """There is no complete revision behind ``current``."""


class LockBusyError(LayoutError):
    """Another seeding run holds the model's ``.lock``."""


def model_slug(hub_id: str) -> str:
    """``segmind/tiny-sd`` -> ``segmind--tiny-sd``: one safe folder name per hub id."""
    slug = hub_id.strip().replace("/", "--")
    check_name(slug, "model name")
    return slug


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise LayoutError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-' (at most 128, no '..')"
        )
    return value


def check_relative_path(path: str) -> PurePosixPath:
    """A manifest path must stay inside its folder: no absolute paths, no '..', no empty parts."""
    if not isinstance(path, str) or any(ord(char) < 32 or char == "\x7f" for char in path):
        # A NUL would otherwise surface as a ValueError from the first os call that gets the path.
        raise LayoutError(f"unsafe path in manifest: {path!r} (control character)")
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or "\\" in path or any(part in ("", ".", "..") for part in pure.parts):
        raise LayoutError(f"unsafe path in manifest: {path!r}")
    if pure.parts != tuple(path.split("/")):
        raise LayoutError(f"unsafe path in manifest: {path!r}")
    return pure


def lora_weights_problem(paths: Collection[str]) -> str | None:
    """Why these release paths are not one LoRA adapter, or None: diffusers' ``load_lora_weights`` reads
    a folder's single top-level ``.safetensors`` file (or its ``pytorch_lora_weights.safetensors``)."""
    weights = sorted(p for p in paths if "/" not in p and p.endswith(".safetensors"))
    if not weights:
        return "no .safetensors weights at the top of the folder (not a LoRA adapter)"
    if len(weights) > 1:
        return f"more than one .safetensors file ({', '.join(weights)}): an adapter is one weights file"
    return None


def release_kind_problem(paths: Collection[str], kind: str) -> str | None:
    """What a release of ``kind`` (MODEL or LORA) must hold and these paths lack, or None."""
    if kind == LORA:
        return lora_weights_problem(paths)
    if MODEL_INDEX not in paths:
        return f"{MODEL_INDEX}: missing (not a diffusers pipeline)"
    return None


def lora_weights_file(release: Path) -> Path:
    """The weights file of a LoRA release folder; LayoutError when it holds none or several."""
    names = [p.name for p in release.iterdir() if p.is_file()] if release.is_dir() else []
    problem = lora_weights_problem(names)
    if problem:
        raise LayoutError(f"{release}: {problem}")
    return release / next(n for n in names if n.endswith(".safetensors"))


@dataclass(frozen=True)
class ModelPaths:
    """Where each part of one model's layout lives, under ``<root>/<name>``; ``kind`` LORA: one adapter's
    layout, under ``<root>/<name>/loras/<adapter>`` (:func:`adapter_paths`)."""

    model_dir: Path
    kind: str = MODEL

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
        if self.kind == LORA:
            if target.is_dir() and lora_weights_problem(os.listdir(target)) is None:
                return target
            raise ModelNotSeededError(
                f"adapter incomplete: {self.current} points at {target}, which has no adapter weights"
            )
        if not (target / "model_index.json").is_file():
            raise ModelNotSeededError(
                f"model incomplete: {self.current} points at {target}, which has no model_index.json"
            )
        return target

    @property
    def loras(self) -> Path:
        """The folder of this model's LoRA adapters."""
        return self.model_dir / LORAS

    def adapter(self, name: str) -> ModelPaths:
        """The layout of this model's adapter ``name``."""
        return ModelPaths(self.loras / check_name(name, "adapter name"), LORA)

    def adapter_names(self) -> list[str]:
        """The adapters with a ``current``, sorted: one listing and one ``lstat`` each, cheap enough for
        every request on NFS (reading an adapter checks its release: ``resolve_current``)."""
        try:
            entries = sorted(os.listdir(self.loras))
        except OSError:  # no loras/ yet (or not a folder): no adapters
            return []
        return [
            name
            for name in entries
            if _NAME.fullmatch(name) and ".." not in name and (self.loras / name / CURRENT).is_symlink()
        ]

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

    @contextlib.contextmanager
    def locked(
        self, timeout: float = 0.0, on_wait: Callable[[], None] | None = None, poll_interval: float = 0.2
    ) -> Iterator[HeldLock]:
        """Hold ``<name>/.lock`` (``flock``; on EFS the NFS client maps it to an NFSv4 lock).

        Waits up to ``timeout`` seconds (calling ``on_wait`` once when it starts waiting), then raises
        LockBusyError. The lock is released when the block exits, or when the process dies.
        """
        self.model_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + timeout
            waiting = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockBusyError(
                            f"another seeding run holds {self.lock} ({_lock_holder(fd)}); "
                            "wait for it to finish and run again"
                        ) from None
                    if not waiting and on_wait is not None:
                        on_wait()
                    waiting = True
                    time.sleep(poll_interval)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
            yield HeldLock(self.model_dir)
        finally:
            os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "holder unknown"
    except OSError:
        return "holder unknown"


@dataclass(frozen=True)
class HeldLock:
    """Proof that the caller holds ``<model_dir>/.lock``; the functions that change a model ask for it."""

    model_dir: Path

    def check(self, paths: ModelPaths) -> None:
        if self.model_dir != paths.model_dir:
            raise LayoutError(f"the lock held is for {self.model_dir}, not {paths.model_dir}")


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def is_openvino_weights(path: str, paths: Collection[str]) -> bool:
    """Whether release path ``path`` is an OpenVINO IR's weights: a .bin beside its .xml in ``paths``."""
    pure = PurePosixPath(path)
    return pure.suffix == ".bin" and pure.with_suffix(OPENVINO_GRAPH_SUFFIX).as_posix() in paths


def pickle_paths(paths: Collection[str]) -> list[str]:
    """The release paths among ``paths`` whose format can run code when loaded, sorted. An IR's .bin is
    exempt only in an OpenVINO release: in a torch one no loader reads it as IR."""
    openvino = release_engine(paths) == "openvino"
    return sorted(
        p
        for p in paths
        if PurePosixPath(p).suffix.lower() in PICKLE_SUFFIXES
        and not (openvino and is_openvino_weights(p, paths))
    )


def find_pickle_weights(folder: Path) -> list[str]:
    """Relative paths of files under ``folder`` whose format can run code when loaded."""
    return pickle_paths({p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()})


def release_engine(paths: Collection[str]) -> str:
    """The engine a release with these paths is for: ``openvino`` (OpenVINO IR) or ``torch`` (safetensors)."""
    return "openvino" if OPENVINO_UNET in paths else "torch"


@dataclass(frozen=True)
class WeightsName:
    """One safetensors file name of a component folder: ``<stem>[.<variant>][-00001-of-00002].safetensors``
    or a shard index ``<stem>.safetensors.index[.<variant>].json`` (legacy variant spellings included)."""

    stem: str
    shard: str = ""  # "-00001-of-00002" for one shard of sharded weights
    variant: str | None = None
    index: bool = False
    # "<stem>-00001-of-00002.<variant>.safetensors" or "<stem>.safetensors.<variant>.index.json": the
    # same file as its current spelling, which diffusers prefers when a folder has both.
    legacy: bool = field(default=False, compare=False)

    @property
    def sharded(self) -> bool:
        return self.index or bool(self.shard)

    @property
    def name(self) -> str:
        """The file name, in diffusers' current spelling."""
        variant = f".{self.variant}" if self.variant else ""
        if self.index:
            return f"{self.stem}.safetensors.index{variant}.json"
        return f"{self.stem}{variant}{self.shard}.safetensors"

    @property
    def plain_name(self) -> str:
        """The same file without its variant: the name diffusers loads when no variant is asked for."""
        return replace(self, variant=None).name


def parse_weights_name(name: str) -> WeightsName | None:
    """A component's safetensors weights or shard index by its file name; None for any other file."""
    for pattern, index, legacy in _WEIGHTS_NAMES:
        match = pattern.fullmatch(name)
        if match:
            parts = match.groupdict()
            return WeightsName(parts["stem"], parts.get("shard") or "", parts.get("variant"), index, legacy)
    return None


def plain_weights(component: Path) -> list[Path]:
    """A component folder's stored safetensors (no variant in the name; shards included), sorted."""
    if not component.is_dir():
        return []
    return sorted(component / name for name in os.listdir(component) if _is_plain_weights(name))


def _is_plain_weights(name: str) -> bool:
    weights = parse_weights_name(name)
    return weights is not None and weights.variant is None and not weights.index


def single_weights_name(names: Iterable[str]) -> str | None:
    """The one stored weights file among a component folder's file names, or None when there is none,
    more than one, or the weights are sharded (shard names or a shard index): what a bf16 copy needs."""
    weights = {name: parsed for name in names if (parsed := parse_weights_name(name))}
    if any(parsed.sharded for parsed in weights.values()):
        return None
    plain = [name for name, parsed in weights.items() if parsed.variant is None]
    return plain[0] if len(plain) == 1 else None


def bf16_copy_path(weights: _AnyPath) -> _AnyPath:
    """``unet/diffusion_pytorch_model.safetensors`` -> ``unet/diffusion_pytorch_model.bf16.safetensors``."""
    parsed = parse_weights_name(weights.name)
    if parsed is None or parsed.sharded or parsed.variant:
        raise ValueError(f"{weights.name} is not an unsharded stored weights file")
    return weights.with_name(replace(parsed, variant=BF16_VARIANT).name)


def single_weights_file(component: Path) -> Path | None:
    """``single_weights_name`` of a component folder on disk (None when the folder does not exist)."""
    if not component.is_dir():
        return None
    name = single_weights_name(os.listdir(component))
    return None if name is None else component / name


def bf16_copy_files(model_dir: Path) -> list[Path] | None:
    """The bf16 copy of every copied component's weights, or None unless each one is complete: one
    unsharded stored file per component and its copy beside it."""
    copies = []
    for name in BF16_COPY_COMPONENTS:
        stored = single_weights_file(model_dir / name)
        if stored is None or not bf16_copy_path(stored).is_file():
            return None
        copies.append(bf16_copy_path(stored))
    return copies


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[ManifestEntry, ...]
    source: str
    # timezone.utc, not datetime.UTC: the seeder's python3 is 3.9.
    created_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")  # noqa: UP017
    )

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
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and check the whole schema, so a bad manifest is refused before anything is fetched."""
        try:
            # Bytes as read from S3 or disk: a manifest that is not UTF-8 is a UnicodeDecodeError here.
            data = json.loads(text)
            entries = tuple(_manifest_entry(e) for e in data["files"])
            manifest = cls(files=entries, source=str(data["source"]), created_at=str(data["created_at"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise LayoutError(f"malformed manifest: {exc}") from exc
        _check_paths_fit_together([entry.path for entry in manifest.files])
        return manifest

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def problems(self, folder: Path, kind: str = MODEL) -> list[str]:
        """Every way ``folder`` differs from this manifest (missing, size, sha256, extra, pickle), and
        what a release of ``kind`` must hold that it lacks."""
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
            if path.is_symlink():
                # A symlinked directory would let listed files live outside the release.
                found.append(f"{relative}: symlinks are refused")
            elif path.is_file() and relative not in listed and relative != MANIFEST:
                found.append(f"{relative}: not in manifest")
        kind_problem = release_kind_problem(listed, kind)
        if kind_problem:
            found.append(kind_problem)
        found.extend(f"{p}: pickle weights are refused" for p in find_pickle_weights(folder))
        return found


def _manifest_entry(raw: dict[str, object]) -> ManifestEntry:
    path, size, sha256 = raw["path"], raw["size"], raw["sha256"]
    if not isinstance(path, str):
        raise ValueError(f"path {path!r} is not a string")
    check_relative_path(path)
    # bool is an int to Python and 1.5 would truncate: only a real, non-negative int is a size.
    if type(size) is not int or size < 0:
        raise ValueError(f"{path}: size {size!r} is not a whole number of bytes")
    if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"{path}: sha256 {sha256!r} is not 64 lowercase hex digits")
    return ManifestEntry(path, size, sha256)


def _check_paths_fit_together(paths: list[str]) -> None:
    """Each path once, none of them also a folder of another, and never the manifest itself."""
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise LayoutError(f"malformed manifest: {path!r} is listed twice")
        seen.add(path)
    folders = {parent.as_posix() for path in paths for parent in PurePosixPath(path).parents}
    clash = sorted(seen & (folders | {MANIFEST}))
    if clash:
        raise LayoutError(
            f"malformed manifest: {clash[0]!r} is listed as a file and is a folder or the manifest"
        )


def write_file_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, then rename it over ``target``.

    Never opens ``target`` itself for writing: a reader never sees a half-written file, and a target that
    is a hard link (``cp -al`` of a live release) keeps its bytes, because it gets a new inode.
    """
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def safe_join(root: Path, relative: str) -> Path:
    """``root / relative`` for a manifest path, creating parent folders; refuses symlinks on the way.

    Checked one component at a time, so a planted symlink (``unet -> /etc``) can never redirect a write
    outside ``root``.
    """
    parts = check_relative_path(relative).parts
    current = root
    for part in parts[:-1]:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            current.mkdir(mode=0o755)
            continue
        if not stat.S_ISDIR(mode):
            raise LayoutError(f"refusing {relative!r}: {current} is not a plain directory (symlink?)")
    target = current / parts[-1]
    if target.is_symlink():
        raise LayoutError(f"refusing {relative!r}: {target} is a symlink")
    return target


@dataclass(frozen=True)
class PublishResult:
    revision: str
    previous: str | None
    reused: bool  # the release was already there: verified and switched only
    pruned: tuple[str, ...] = ()


def verify_release(folder: Path, manifest_sha256: str | None = None, kind: str = MODEL) -> Manifest:
    """Check ``folder`` against its own manifest.json (a release of ``kind``); raises LayoutError listing
    every problem.

    ``manifest_sha256`` pins the manifest itself, so a same-named revision with other content is caught.
    """
    manifest_path = folder / MANIFEST
    if folder.is_symlink() or not folder.is_dir():
        raise LayoutError(f"{folder} is not a plain directory")
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise LayoutError(f"{manifest_path} is missing")
    if manifest_sha256 is not None and sha256_file(manifest_path) != manifest_sha256:
        raise LayoutError(
            f"{manifest_path} is not the expected manifest (sha256 {manifest_sha256[:12]}...): "
            "the revision name is taken by different content; seed under a new revision"
        )
    manifest = Manifest.from_json(manifest_path.read_bytes())
    problems = manifest.problems(folder, kind)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise LayoutError(f"manifest mismatch in {folder}: {shown}")
    return manifest


def activate_baked_release(model_dir: Path, revision: str) -> Manifest:
    """What image/Dockerfile.baked runs on the release it copied in: ``current`` -> ``releases/<revision>``
    (relative, as the seeder makes it on EFS), then every file verified against the release's manifest."""
    paths = ModelPaths(model_dir)
    paths.switch_current(revision)
    return verify_release(paths.resolve_current())


def fix_ownership(folder: Path, owner: tuple[int, int]) -> None:
    """Folders 0755, files 0644, all owned by ``owner``: readable by the access point's POSIX user."""
    uid, gid = owner
    for directory, _, files in os.walk(folder):
        for path, mode in [(directory, 0o755)] + [(os.path.join(directory, f), 0o644) for f in files]:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                raise LayoutError(f"refusing to fix ownership through a symlink: {path}")
            if (info.st_uid, info.st_gid) != (uid, gid):
                os.chown(path, uid, gid, follow_symlinks=False)
            if stat.S_IMODE(info.st_mode) != mode:
                os.chmod(path, mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare_model_dir(paths: ModelPaths, owner: tuple[int, int] | None) -> None:
    paths.releases.mkdir(parents=True, exist_ok=True)
    odd_current = paths.current.exists() and not paths.current.is_symlink()
    # An adapter's folder sits in the model's loras/, which the Lambda's user must be able to list too.
    folders = ((paths.model_dir.parent,) if paths.kind == LORA else ()) + (paths.model_dir, paths.releases)
    if any(folder.is_symlink() for folder in folders) or odd_current:
        raise LayoutError(f"{paths.model_dir} does not follow the layout (releases/ or current is odd)")
    if owner is not None:
        for folder in folders:
            info = os.lstat(folder)
            if (info.st_uid, info.st_gid) != owner:
                os.chown(folder, *owner)
            os.chmod(folder, 0o755)


def activate_release(
    paths: ModelPaths, revision: str, lock: HeldLock, manifest_sha256: str | None = None
) -> str | None:
    """Verify ``releases/<revision>`` against its manifest, then switch ``current`` to it (rollback).

    Returns the previous revision. On any failure ``current`` is left as it was.
    """
    lock.check(paths)
    release = paths.release(revision)
    if not release.is_dir() or release.is_symlink():
        known = ", ".join(paths.revisions()) or "none"
        raise LayoutError(f"no release {revision!r} under {paths.releases} (present: {known})")
    verify_release(release, manifest_sha256, paths.kind)
    return _switch(paths, revision)


def prune_releases(paths: ModelPaths, keep: int, lock: HeldLock) -> tuple[str, ...]:
    """Delete all but the ``keep`` newest releases; never the one ``current`` points at."""
    lock.check(paths)
    if keep < 1:
        raise LayoutError(f"keep must be at least 1, not {keep}")
    for leftover in paths.model_dir.glob(".trash-*"):
        shutil.rmtree(leftover)
    revisions = paths.revisions()
    keepers = set(revisions[-keep:]) | {paths.current_revision()}
    pruned = []
    for revision in revisions:
        if revision in keepers:
            continue
        # Renamed first, so a half-deleted folder never sits under releases/.
        trash = paths.model_dir / f".trash-{revision}-{os.getpid()}"
        os.rename(paths.release(revision), trash)
        shutil.rmtree(trash)
        pruned.append(revision)
    return tuple(pruned)


def publish_release(
    paths: ModelPaths,
    revision: str,
    lock: HeldLock,
    *,
    keep: int = DEFAULT_KEEP,
    owner: tuple[int, int] | None = None,
    manifest_sha256: str | None = None,
) -> PublishResult:
    """Make ``.staging-<revision>`` (with its manifest.json) the live release.

    verify every file -> fix ownership -> rename into releases/ -> switch ``current`` -> prune.
    A release that is already there is only verified and switched. Raises LayoutError before touching
    ``current`` if anything is wrong.
    """
    lock.check(paths)
    _prepare_model_dir(paths, owner)
    release = paths.release(revision)
    staging = paths.staging(revision)
    reused = release.exists() or release.is_symlink()
    if reused:
        verify_release(release, manifest_sha256, paths.kind)
        if staging.exists():
            shutil.rmtree(staging)
    else:
        verify_release(staging, manifest_sha256, paths.kind)
        os.rename(staging, release)
        os.utime(release)  # releases are ordered by modification time: this one is the newest
        _fsync_dir(paths.releases)
    if owner is not None:
        fix_ownership(release, owner)
    previous = _switch(paths, revision)
    return PublishResult(revision, previous, reused, prune_releases(paths, keep, lock))


def _switch(paths: ModelPaths, revision: str) -> str | None:
    previous = paths.current_revision()
    paths.switch_current(revision)
    _fsync_dir(paths.model_dir)
    return previous


def install_release(
    paths: ModelPaths,
    revision: str,
    source_dir: Path,
    *,
    source: str | None = None,
    keep: int = DEFAULT_KEEP,
    owner: tuple[int, int] | None = None,
    lock_timeout: float = 0.0,
) -> PublishResult:
    """Copy a local diffusers folder in as ``releases/<revision>`` and switch ``current`` to it.

    The local twin of the seeder's sync (tests, the demo): same staging, verification and switch.
    """
    with paths.locked(lock_timeout) as lock:
        staging = paths.staging(revision)
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(source_dir, staging, symlinks=True)
        manifest = Manifest.build(staging, source=source or str(source_dir))
        release = paths.release(revision)
        if release.is_dir():
            existing = Manifest.from_json((release / MANIFEST).read_bytes())
            shutil.rmtree(staging)
            if existing.files != manifest.files:
                raise LayoutError(f"release {revision!r} already exists with different content")
        else:
            write_file_atomically(staging / MANIFEST, manifest.to_json().encode())
        return publish_release(paths, revision, lock, keep=keep, owner=owner)
