"""The seeder's side of seeding: S3 -> ``.staging-<revision>`` -> verified release -> ``current``.

Runs on the seeder instance (Amazon Linux 2023: ``python3`` 3.9, standard library only). The driver
puts it in the weights bucket as a zip application together with ``sd_lambda/layout.py`` verbatim (see
``sd_lambda.seeding.payload``), so the layout logic is one piece of code on both sides.

    python3 program.pyz sync --mount /mnt/models --name N --revision R --bucket B --s3-prefix P
    python3 program.pyz rollback --mount /mnt/models --name N --revision R
    python3 program.pyz check-model --mount /mnt/models --name N

``--adapter A`` makes ``sync`` and ``rollback`` work on the model's LoRA adapter ``A`` instead
(``<name>/loras/<A>``, the same layout), and only once the model itself is seeded: nothing is created for
an adapter of a model that is not there. ``check-model`` says whether it is (and which adapters it has).

``sync`` holds ``<name>/.lock`` throughout, downloads every manifest file into the staging folder (files
already there and verified are kept, so an interrupted run continues where it stopped), then hands over
to ``layout.publish_release``: verify -> fix ownership -> rename into releases/ -> switch -> prune. Any
failure exits non-zero before ``current`` changes. The last stdout line is ``RESULT {json}``.

With ``--progress-file PATH`` it keeps ``PATH`` up to date with its phase, bytes and files done: SSM hands
the driver a command's output only once the command has finished, so the driver reads this file with a
short command of its own while the sync runs (``sd_lambda.seeding.remote.Probe``).

S3 is read with the AWS CLI (``aws s3 cp``, shipped with Amazon Linux 2023; ``--aws-cli`` names another
executable): it brings the instance-profile credentials (IMDSv2), signing, retries, parallel ranged
downloads of large objects and ``AWS_ENDPOINT_URL(_S3)`` (tests point it at a local S3). This program
checks every byte it gets against the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sd_lambda.layout import (
    DEFAULT_KEEP,
    LAMBDA_OWNER,
    LORA,
    MANIFEST,
    MODEL,
    LayoutError,
    LockBusyError,
    Manifest,
    ManifestEntry,
    ModelPaths,
    activate_release,
    check_name,
    pickle_paths,
    publish_release,
    release_kind_problem,
    safe_join,
    sha256_file,
    write_file_atomically,
)

RESULT_PREFIX = "RESULT "
# Installed by the seeder's user data (infra/modules/seeder/user_data.sh.tftpl): installs
# amazon-efs-utils and mounts the access point, on every boot and whenever a run starts it.
MOUNT_UNIT = "sd-lambda-efs-mount.service"
# The user data's first-boot stop (`shutdown -h +1`) is skipped while SEED_MARKER exists (the driver's
# mount check touches it) and cancelled by a mount check that finds FIRST_BOOT_STOP; both files are in the
# user data and remote.mount_check_script too, spelled out (tests check the three agree).
SEED_MARKER = "/run/sd-lambda-seeding"
FIRST_BOOT_STOP = "/run/sd-lambda-stop-pending"
# The driver names one progress file per run in this folder. /run is a tmpfs that only root (the SSM agent
# runs commands as root) writes, emptied at every boot: the files never outlive the instance's run.
PROGRESS_DIR = "/run/sd-lambda-sync"
# How often a download's progress is written while the AWS CLI runs (the driver reads it every 15 s).
PROGRESS_EVERY_S = 5.0
# `shutdown -c` talks to logind over D-Bus: bounded, so a wedged bus cannot hold a seed up.
SHUTDOWN_CANCEL_TIMEOUT_S = 30
DEFAULT_AWS_CLI = "aws"
# Downloads land here first and take the file's name only once verified.
PART_SUFFIX = ".part"
STDERR_TAIL_CHARS = 400
ACCESS_DENIED_MARKS = ("AccessDenied", "(403)", "Forbidden", "KMS")
NOT_FOUND_MARKS = ("NoSuchKey", "NoSuchBucket", "(404)", "does not exist", "Not Found")


class SyncError(Exception):
    """A failure reported as one line; ``current`` has not been touched."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """The run's state as one small JSON object in ``path`` (none without a path): ``phase``,
    ``bytes_done``/``bytes_total``, ``files_done``/``files_total``. Replaced whole by a rename at every
    change, so a reader gets one state or the next, never half of one. Progress is a courtesy: a file that
    cannot be written is reported once and never fails the sync."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.state: dict[str, Any] = {
            "phase": "starting",
            "bytes_done": 0,
            "bytes_total": 0,
            "files_done": 0,
            "files_total": 0,
        }

    def update(self, **changes: Any) -> None:
        self.state.update(changes)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_file_atomically(self.path, json.dumps(self.state, sort_keys=True).encode())
        except OSError as exc:
            log(f"progress file {self.path} not written ({exc.strerror or exc}); the sync goes on without it")
            self.path = None


def in_flight(part: Path, size: int) -> int:
    """Bytes of a download to ``part`` written so far, at most ``size``. The AWS CLI writes under a
    temporary name beside its destination (``<part>.<random>``) and renames it at the end, so every name
    starting with ``part``'s counts."""
    written = 0
    with contextlib.suppress(OSError):
        for other in part.parent.iterdir():
            if other.name.startswith(part.name):
                written += other.lstat().st_size
    return min(written, size)


@dataclass(frozen=True)
class AwsCli:
    """``aws s3 cp`` of single objects from one bucket; failures become one-line SyncErrors."""

    executable: str
    bucket: str
    region: str | None = None

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def read(self, key: str) -> bytes:
        return self._copy(key, "-")

    def download(self, key: str, destination: Path, on_wait: Callable[[], None] | None = None) -> None:
        """``on_wait`` is called every ``PROGRESS_EVERY_S`` seconds while the AWS CLI runs."""
        self._copy(key, str(destination), on_wait)

    def _copy(self, key: str, destination: str, on_wait: Callable[[], None] | None = None) -> bytes:
        argv = [self.executable, "s3", "cp", self.url(key), destination, "--only-show-errors"]
        if self.region:
            argv += ["--region", self.region]
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise SyncError(
                f"cannot run the AWS CLI {self.executable!r} ({exc.strerror or exc}): "
                "install it or pass --aws-cli PATH"
            ) from None
        with process:
            while True:
                try:
                    stdout, stderr = process.communicate(timeout=PROGRESS_EVERY_S if on_wait else None)
                    break
                except subprocess.TimeoutExpired:
                    if on_wait is not None:
                        on_wait()
                except BaseException:  # as subprocess.run does: never leave the CLI running on its own
                    process.kill()
                    raise
        if process.returncode != 0:
            raise self._explain(key, process.returncode, stderr.decode(errors="replace"))
        return stdout

    def _explain(self, key: str, returncode: int, stderr: str) -> SyncError:
        tail = " ".join(stderr.split())[-STDERR_TAIL_CHARS:] or "no error output"
        where = self.url(key)
        if any(mark in stderr for mark in ACCESS_DENIED_MARKS):
            needed = (
                "kms:Decrypt on the bucket's key"
                if "KMS" in stderr
                else "s3:GetObject (and s3:ListBucket, without which a missing object reads as 403)"
            )
            what = f"AccessDenied reading {where}: the seeder's role needs {needed}"
        elif any(mark in stderr for mark in NOT_FOUND_MARKS):
            what = f"{where} does not exist (upload not finished, or another bucket?)"
        else:
            what = f"reading {where} failed"
        return SyncError(f"{what} [aws exit {returncode}: {tail}]")


def fetch(
    cli: AwsCli, key: str, target: Path, entry: ManifestEntry, on_bytes: Callable[[int], None] | None = None
) -> None:
    """Download ``key`` to ``target`` through ``target.part``; only bytes that match ``entry`` stay.
    ``on_bytes`` hears how many bytes have arrived, every ``PROGRESS_EVERY_S`` seconds."""
    part = target.with_name(target.name + PART_SUFFIX)
    part.unlink(missing_ok=True)
    cli.download(key, part, (lambda: on_bytes(in_flight(part, entry.size))) if on_bytes else None)
    size = part.stat().st_size if part.is_file() and not part.is_symlink() else -1
    digest = sha256_file(part) if size == entry.size else None
    if digest != entry.sha256:
        part.unlink(missing_ok=True)
        found = f"sha256 {digest[:12]}" if digest else f"{size} bytes"
        expected = entry.sha256[:12] if digest else entry.size
        raise SyncError(
            f"manifest mismatch: {cli.url(key)} has {found}, the manifest says {expected} "
            "(corrupted or replaced object); nothing was switched"
        )
    os.replace(part, target)


# --- commands ----------------------------------------------------------------------------------


def _matches(path: Path, entry: ManifestEntry) -> bool:
    """A staged file that can be kept (``_tidy_staging`` has already dropped hard-linked ones)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == entry.size and sha256_file(path) == entry.sha256


def _tidy_staging(staging: Path, manifest: Manifest) -> None:
    """Make an earlier attempt's staging folder safe to continue: refuse symlinks; drop every file the
    manifest does not list (partial downloads of a killed run), every folder no listed file lives in (a
    folder where the manifest now has a file would otherwise fail each run with EISDIR), and every file
    with another hard link (``cp -al`` of a live release: its bytes belong to that release too)."""
    files = {entry.path for entry in manifest.files}
    folders = {parent.as_posix() for path in files for parent in PurePosixPath(path).parents}
    for directory, subdirectories, names in os.walk(staging):
        for name in list(subdirectories) + names:
            path = Path(directory) / name
            relative = path.relative_to(staging).as_posix()
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                raise SyncError(f"refusing symlink in staging: {path}")
            if stat.S_ISDIR(info.st_mode):
                if relative not in folders:
                    shutil.rmtree(path)
                    subdirectories.remove(name)
            elif relative not in files or not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                if info.st_nlink != 1 and stat.S_ISREG(info.st_mode):
                    log(f"  {relative}: has {info.st_nlink} hard links, dropped from staging (never written)")
                path.unlink()  # removes this name only: another link's bytes stay as they are


def _check_manifest(manifest: Manifest, kind: str = MODEL) -> None:
    pickles = pickle_paths({e.path for e in manifest.files})
    if pickles:
        raise SyncError(f"pickle weights are refused: {', '.join(pickles)}")
    problem = release_kind_problem({e.path for e in manifest.files}, kind)
    if problem:
        raise SyncError(f"the manifest does not describe a {kind} release: {problem}")


def _paths(args: argparse.Namespace) -> ModelPaths:
    """The layout a command works on: the model's, or with ``--adapter`` that adapter's, once the model
    is seeded (checked before anything is created: an adapter needs the model it adapts)."""
    model = ModelPaths(Path(args.mount) / check_name(args.name, "model name"))
    if getattr(args, "adapter", None) is None:
        return model
    adapter = model.adapter(args.adapter)
    _seeded(model)
    return adapter


def _seeded(model: ModelPaths) -> str:
    """The model's current revision; SyncError when it has none to adapt."""
    try:
        model.resolve_current()
    except (LayoutError, OSError, RuntimeError) as exc:
        raise SyncError(f"{exc}: seed the model first (make seed-models)") from None
    return str(model.current_revision())


def _mounted(args: argparse.Namespace) -> bool:
    return os.path.isdir(args.mount) and (not args.require_mount or os.path.ismount(args.mount))


def _start_mount_unit(unit: str) -> None:
    """Run the seeder's boot setup (install amazon-efs-utils, mount EFS) now, if it has not succeeded.

    ``systemctl start`` of a oneshot unit returns once the unit has finished: at once when it already
    succeeded at boot, after it if it is still running (a first boot), and it runs it again when it
    failed. The unit bounds its own time (TimeoutStartSec), so this call needs no timeout of its own.
    """
    try:
        done = subprocess.run(["systemctl", "start", unit], stdin=subprocess.DEVNULL, capture_output=True)
    except OSError as exc:
        raise SyncError(f"cannot run systemctl to start {unit} ({exc.strerror or exc})") from None
    if done.returncode != 0:
        raise SyncError(f"EFS setup on the seeder failed: {_unit_failure(unit, done.stderr)}")


def _unit_failure(unit: str, systemctl_stderr: bytes) -> str:
    """The unit's own last ``error:`` line (it says what failed: the package install or the mount)."""
    try:
        journal = subprocess.run(
            ["journalctl", "--unit", unit, "--boot", "--output", "cat", "--no-pager", "--lines", "50"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        ).stdout.decode(errors="replace")
    except OSError:
        journal = ""
    errors = [line[len("error:") :].strip() for line in journal.splitlines() if line.startswith("error:")]
    found = errors[-1] if errors else " ".join(systemctl_stderr.decode(errors="replace").split())
    return f"{found or unit + ' failed'} (details: journalctl -u {unit} on the seeder)"


def _cancel_pending_shutdown(args: argparse.Namespace) -> None:
    """On the seeder (``--require-mount`` with its unit), cancel a stop the first boot scheduled.

    The user data stops a freshly set up instance a minute after its setup (``shutdown -h +1``) unless it
    saw a seed arrive; a run that arrives in that minute anyway would be killed half-way. ``shutdown -c``
    cancels a pending shutdown, one scheduled with a time other than "now" (shutdown(8),
    https://www.freedesktop.org/software/systemd/man/249/shutdown.html). When none is pending, or there
    is no shutdown command (local runs), nothing is lost: every outcome is ignored. The seeding driver
    stops the instance after the run.
    """
    if not args.require_mount or args.mount_unit == "none":
        return  # not on the seeder: never touch the power state of the machine a test or a user runs on
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            ["shutdown", "-c"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SHUTDOWN_CANCEL_TIMEOUT_S,
        )


def _wait_for_mount(args: argparse.Namespace) -> None:
    """Never fill the instance's root volume because EFS is not mounted. With ``--mount-unit`` the
    boot setup unit is (re)started first, so a setup that failed at boot is retried by every run."""
    if args.require_mount and args.mount_unit != "none" and not _mounted(args):
        log(f"{args.mount} is not mounted: starting {args.mount_unit}")
        _start_mount_unit(args.mount_unit)
    deadline = time.monotonic() + args.mount_wait
    while not _mounted(args):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SyncError(
                f"{args.mount} is not a mounted file system after waiting {args.mount_wait:g}s "
                f"(is EFS mounted? journalctl -u {args.mount_unit} on the seeder)"
            )
        time.sleep(min(5.0, remaining))


def sync(args: argparse.Namespace) -> dict[str, Any]:
    revision = check_name(args.revision, "revision")
    progress = Progress(args.progress_file)
    progress.update(phase="waiting for EFS")
    _wait_for_mount(args)
    paths = _paths(args)

    def wait_for_lock() -> None:
        log(f"waiting for {paths.lock} ...")
        progress.update(phase="waiting for another run on this model")

    with paths.locked(args.lock_timeout, on_wait=wait_for_lock) as lock:
        downloaded, reused = 0, 0
        if not (paths.release(revision).exists() or paths.release(revision).is_symlink()):
            s3 = AwsCli(args.aws_cli, args.bucket, args.region)
            prefix = args.s3_prefix.rstrip("/") + "/"
            raw = s3.read(prefix + MANIFEST)
            if args.manifest_sha256 and hashlib.sha256(raw).hexdigest() != args.manifest_sha256:
                raise SyncError(
                    f"manifest mismatch: s3://{args.bucket}/{prefix}{MANIFEST} is not the manifest "
                    "that was uploaded (replaced meanwhile?)"
                )
            manifest = Manifest.from_json(raw)
            _check_manifest(manifest, paths.kind)
            staging = paths.staging(revision)
            if staging.is_symlink():
                raise SyncError(f"refusing symlink: {staging}")
            staging.mkdir(mode=0o755, exist_ok=True)
            _tidy_staging(staging, manifest)
            write_file_atomically(safe_join(staging, MANIFEST), raw)
            log(f"syncing {len(manifest.files)} files ({manifest.total_bytes} bytes) into {staging}")
            done = {"files_done": 0, "bytes_done": 0}
            progress.update(
                phase="checking staged files",
                files_total=len(manifest.files),
                bytes_total=manifest.total_bytes,
                **done,
            )
            for entry in manifest.files:
                target = safe_join(staging, entry.path)
                if _matches(target, entry):
                    reused += 1
                else:
                    progress.update(phase="downloading")
                    fetch(
                        s3,
                        prefix + entry.path,
                        target,
                        entry,
                        lambda count, before=done["bytes_done"]: progress.update(bytes_done=before + count),
                    )
                    downloaded += entry.size
                    log(f"  {entry.path} ({entry.size} bytes)")
                done["files_done"] += 1
                done["bytes_done"] += entry.size
                progress.update(**done)
        progress.update(phase="verifying and switching")
        result = publish_release(
            paths, revision, lock, keep=args.keep, owner=args.owner, manifest_sha256=args.manifest_sha256
        )
    summary = {
        "model": args.name,
        **({"adapter": args.adapter} if paths.kind == LORA else {}),
        "revision": result.revision,
        "previous": result.previous,
        "already_present": result.reused,
        "downloaded_bytes": downloaded,
        "reused_files": reused,
        "pruned": list(result.pruned),
        "releases": paths.revisions(),
    }
    progress.update(phase="done")
    return summary


def rollback(args: argparse.Namespace) -> dict[str, Any]:
    _wait_for_mount(args)
    paths = _paths(args)
    if not paths.model_dir.is_dir():
        what = f"adapter {args.adapter!r} of model" if paths.kind == LORA else "model"
        raise SyncError(f"no {what} {args.name!r} under {args.mount}")
    with paths.locked(args.lock_timeout, on_wait=lambda: log(f"waiting for {paths.lock} ...")) as lock:
        previous = activate_release(paths, check_name(args.revision, "revision"), lock)
    return {
        "model": args.name,
        **({"adapter": args.adapter} if paths.kind == LORA else {}),
        "revision": args.revision,
        "previous": previous,
        "releases": paths.revisions(),
    }


def check_model(args: argparse.Namespace) -> dict[str, Any]:
    """Read-only: the model's current revision and its adapters; SyncError when it is not seeded."""
    _wait_for_mount(args)
    model = ModelPaths(Path(args.mount) / check_name(args.name, "model name"))
    return {"model": args.name, "revision": _seeded(model), "adapters": model.adapter_names()}


def _owner(value: str) -> tuple[int, int] | None:
    if value == "none":
        return None
    uid, _, gid = value.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected UID:GID or 'none', not {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-lambda-efs-sync", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func in (("sync", sync), ("rollback", rollback), ("check-model", check_model)):
        sub = commands.add_parser(name)
        sub.set_defaults(func=func)
        sub.add_argument("--mount", required=True, help="where the EFS access point is mounted")
        sub.add_argument("--name", required=True, help="model folder (slug)")
        if func is check_model:
            sub.add_argument("--require-mount", action="store_true", help="fail unless --mount is mounted")
            sub.add_argument("--mount-wait", type=float, default=0.0, help="seconds to wait for the mount")
            sub.add_argument("--mount-unit", default=MOUNT_UNIT, help="as for sync")
            continue
        sub.add_argument("--adapter", default=None, help="the model's LoRA adapter (loras/ADAPTER) instead")
        sub.add_argument("--revision", required=True)
        sub.add_argument("--lock-timeout", type=float, default=0.0, help="seconds to wait for .lock")
        sub.add_argument("--require-mount", action="store_true", help="fail unless --mount is a mount point")
        sub.add_argument("--mount-wait", type=float, default=0.0, help="seconds to wait for the mount")
        sub.add_argument(
            "--mount-unit",
            default=MOUNT_UNIT,
            help="with --require-mount: systemd unit started when --mount is not mounted, or 'none'",
        )
    sync_parser = commands.choices["sync"]
    sync_parser.add_argument("--bucket", required=True)
    sync_parser.add_argument("--s3-prefix", required=True, help="key prefix of this revision's objects")
    sync_parser.add_argument("--region", default=None, help="the bucket's region (default: the CLI's)")
    sync_parser.add_argument(
        "--aws-cli", default=DEFAULT_AWS_CLI, help="the AWS CLI executable (default: aws on PATH)"
    )
    sync_parser.add_argument("--manifest-sha256", default=None, help="sha256 of the uploaded manifest.json")
    sync_parser.add_argument(
        "--progress-file", default=None, help="keep this JSON file up to date with the run's progress"
    )
    sync_parser.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="releases kept when pruning")
    sync_parser.add_argument(
        "--owner", type=_owner, default=LAMBDA_OWNER, help="UID:GID for every file, or 'none'"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cancel_pending_shutdown(args)  # first, before the mount wait: the stop may be seconds away
    try:
        result = args.func(args)
    except LockBusyError as exc:
        log(f"error: {exc}")
        return 3
    except (SyncError, LayoutError, OSError) as exc:
        log(f"error: {exc}")
        return 1
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
