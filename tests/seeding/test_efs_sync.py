"""The seeder's program, run for real (the shipped zip, Python 3.9) against a local S3 and a temp "EFS"."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from sd_lambda.layout import Manifest, ModelPaths, verify_release
from sd_lambda.seeding.progress import describe_sync

from .conftest import Bucket, SeederProgram, make_model

NAME = "acme--tiny-sd"


def _paths(seeder: SeederProgram, name: str = NAME) -> ModelPaths:
    return ModelPaths(seeder.mount / name)


def test_happy_path_real_pipeline(seeder: SeederProgram, bucket: Bucket, tiny_model_dir: Path) -> None:
    sha = bucket.put_folder(tiny_model_dir, NAME, "r1")
    outcome = seeder.run("sync", NAME, "r1", "--manifest-sha256", sha)
    assert outcome.returncode == 0, outcome.stderr
    paths = _paths(seeder)
    assert os.readlink(paths.current) == "releases/r1"
    release = paths.resolve_current()
    manifest = verify_release(release, sha)
    assert outcome.result["downloaded_bytes"] == manifest.total_bytes
    assert outcome.result["already_present"] is False
    assert not paths.staging("r1").exists()
    assert [p.name for p in paths.model_dir.iterdir() if p.name.endswith(".part")] == []
    for path in release.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), path
    # The Lambda's side can load it: every component the pipeline needs is there.
    assert json.loads((release / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"

    again = seeder.run("sync", NAME, "r1", "--manifest-sha256", sha)
    assert again.returncode == 0, again.stderr
    assert again.result["already_present"] is True
    assert again.result["downloaded_bytes"] == 0


def test_resume_after_interrupted_run(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    assert seeder.run("sync", NAME, "r1").returncode == 0
    v2 = make_model(tmp_path / "v2", "v2")
    # Interrupted: the run dies on the missing object after fetching the others.
    bucket.put_folder(v2, NAME, "r2", skip="unet/part2.safetensors")
    failed = seeder.run("sync", NAME, "r2")
    assert failed.returncode == 1
    (error,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    missing = f"s3://{bucket.name}/models/{NAME}/r2/unet/part2.safetensors"
    assert error.startswith(f"error: {missing} does not exist (upload not finished, or another bucket?)")
    assert "[aws exit 1: " in error  # the AWS CLI's own words, on the same line
    assert "(404)" in error
    paths = _paths(seeder)
    assert paths.current_revision() == "r1"
    assert not paths.release("r2").exists()
    staged = {
        p.relative_to(paths.staging("r2")).as_posix() for p in paths.staging("r2").rglob("*.safetensors")
    }
    assert staged == {"unet/part0.safetensors", "unet/part1.safetensors"}
    # ... and killed half-way through another file: its .part, and the AWS CLI's own temporary file.
    weights = (v2 / "unet" / "part2.safetensors").read_bytes()
    leftovers = [paths.staging("r2") / "unet" / f"part2.safetensors.part{tail}" for tail in ("", ".3fA9c0De")]
    for leftover in leftovers:
        leftover.write_bytes(weights[: len(weights) // 2])

    bucket.put(f"models/{NAME}/r2/unet/part2.safetensors", weights)
    resumed = seeder.run("sync", NAME, "r2")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.result["reused_files"] == 3  # model_index.json, part0, part1: verified, not fetched
    assert resumed.result["downloaded_bytes"] == len(weights)  # the interrupted file, whole
    assert resumed.result["previous"] == "r1"
    assert paths.current_revision() == "r2"
    assert (paths.resolve_current() / "unet" / "part2.safetensors").read_bytes() == weights
    # The leftovers were dropped, not carried into the release (verify_release refuses unlisted files).
    verify_release(paths.release("r2"))
    assert not [p for p in paths.release("r2").rglob("*") if ".part" in p.name]


def test_corrupted_object_never_switches(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    assert seeder.run("sync", NAME, "r1").returncode == 0
    bucket.put_folder(make_model(tmp_path / "v2", "v2"), NAME, "r2")
    bucket.put(f"models/{NAME}/r2/unet/part1.safetensors", b"tampered")
    outcome = seeder.run("sync", NAME, "r2")
    assert outcome.returncode == 1
    assert "manifest mismatch" in outcome.stderr
    assert "unet/part1.safetensors" in outcome.stderr
    paths = _paths(seeder)
    assert os.readlink(paths.current) == "releases/r1"
    verify_release(paths.resolve_current())
    assert paths.revisions() == ["r1"]
    assert not (paths.staging("r2") / "unet" / "part1.safetensors").exists()
    assert not (paths.staging("r2") / "unet" / "part1.safetensors.part").exists()


def test_replaced_manifest_is_refused(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    sha = bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    bucket.put_folder(make_model(tmp_path / "v2", "v2"), NAME, "r1")  # someone re-uploaded r1
    outcome = seeder.run("sync", NAME, "r1", "--manifest-sha256", sha)
    assert outcome.returncode == 1
    assert "not the manifest that was uploaded" in outcome.stderr
    assert not _paths(seeder).current.is_symlink()


def test_lock_refuses_a_second_run(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    paths = _paths(seeder)
    with paths.locked():  # another run, as far as flock is concerned
        outcome = seeder.run("sync", NAME, "r1")
    assert outcome.returncode == 3
    assert "another seeding run holds" in outcome.stderr
    assert not paths.current.is_symlink()
    assert not paths.staging("r1").exists()


def test_lock_waits_then_proceeds(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    paths = _paths(seeder)
    with paths.locked():
        process = seeder.start("sync", NAME, "r1", "--lock-timeout", "60")
        assert process.stderr is not None
        first_line = process.stderr.readline()  # blocks until the program reports it is waiting
        assert "waiting for" in first_line
        assert not paths.staging("r1").exists()  # nothing happens while the lock is held
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert paths.current_revision() == "r1"


def test_concurrent_runs_serialize(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1", files=6), NAME, "r1")
    bucket.put_folder(make_model(tmp_path / "v2", "v2", files=6), NAME, "r2")
    first = seeder.start("sync", NAME, "r1", "--lock-timeout", "60")
    second = seeder.start("sync", NAME, "r2", "--lock-timeout", "60")
    for process in (first, second):
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
    paths = _paths(seeder)
    assert sorted(paths.revisions()) == ["r1", "r2"]
    for revision in ("r1", "r2"):
        verify_release(paths.release(revision))
    assert paths.current_revision() in {"r1", "r2"}
    assert [p.name for p in paths.model_dir.iterdir() if p.name.startswith(".staging-")] == []


def test_rollback(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    for revision in ("r1", "r2"):
        bucket.put_folder(make_model(tmp_path / revision, revision), NAME, revision)
        assert seeder.run("sync", NAME, revision).returncode == 0
    paths = _paths(seeder)
    back = seeder.run("rollback", NAME, "r1")
    assert back.returncode == 0, back.stderr
    assert back.result["previous"] == "r2"
    assert os.readlink(paths.current) == "releases/r1"

    missing = seeder.run("rollback", NAME, "r9")
    assert missing.returncode == 1
    assert "no release 'r9'" in missing.stderr
    assert "present: r1, r2" in missing.stderr

    (paths.release("r2") / "unet" / "part0.safetensors").write_bytes(b"bit rot")
    damaged = seeder.run("rollback", NAME, "r2")
    assert damaged.returncode == 1
    assert "manifest mismatch" in damaged.stderr
    assert paths.current_revision() == "r1"


def test_pruning_keeps_the_newest(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    for revision in ("r1", "r2", "r3", "r4"):
        bucket.put_folder(make_model(tmp_path / revision, revision, files=1), NAME, revision)
        outcome = seeder.run("sync", NAME, revision, "--keep", "2")
        assert outcome.returncode == 0, outcome.stderr
    assert outcome.result["pruned"] == ["r2"]
    paths = _paths(seeder)
    assert paths.revisions() == ["r3", "r4"]
    assert paths.current_revision() == "r4"
    assert [p for p in paths.model_dir.iterdir() if p.name.startswith(".trash-")] == []


def _manifest_with(tmp_path: Path, path: str) -> str:
    folder = make_model(tmp_path / "m", "m", files=1)
    manifest = json.loads(Manifest.build(folder, source="test").to_json())
    manifest["files"].append({"path": path, "size": 1, "sha256": "0" * 64})
    return json.dumps(manifest)


def test_path_traversal_refused(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    for revision, evil in (("r1", "../../escaped.safetensors"), ("r2", "/tmp/escaped.safetensors")):
        bucket.put_manifest(f"models/{NAME}/{revision}/", _manifest_with(tmp_path / revision, evil))
        bucket.put(f"models/{NAME}/{evil.lstrip('/')}", b"x")
        outcome = seeder.run("sync", NAME, revision)
        assert outcome.returncode == 1
        assert "unsafe path in manifest" in outcome.stderr
    assert not (seeder.mount / "escaped.safetensors").exists()
    assert not _paths(seeder).current.is_symlink()


def test_symlink_in_staging_refused(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    outside = tmp_path / "outside"
    outside.mkdir()
    staging = _paths(seeder).staging("r1")
    staging.mkdir(parents=True)
    (staging / "unet").symlink_to(outside)
    outcome = seeder.run("sync", NAME, "r1")
    assert outcome.returncode == 1
    assert "symlink" in outcome.stderr
    assert list(outside.iterdir()) == []
    assert not _paths(seeder).current.is_symlink()


def test_pickle_weights_refused(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    folder = make_model(tmp_path / "v1", "v1", files=1)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    bucket.put_folder(folder, NAME, "r1")
    outcome = seeder.run("sync", NAME, "r1")
    assert outcome.returncode == 1
    assert "pickle weights are refused: unet/diffusion_pytorch_model.bin" in outcome.stderr
    assert not _paths(seeder).staging("r1").exists()


def test_unmounted_efs_is_refused(seeder: SeederProgram, bucket: Bucket, tmp_path: Path) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    outcome = seeder.run("sync", NAME, "r1", "--require-mount", "--mount-wait", "0.2", "--mount-unit", "none")
    assert outcome.returncode == 1
    assert "is not a mounted file system after waiting 0.2s" in outcome.stderr
    assert list(seeder.mount.iterdir()) == []


# --- the program's edge cases (#21 item 12) and the sha256 promise (#21 item 20b) ----------------------


def _same_size_other_bytes(data: bytes) -> bytes:
    return bytes(byte ^ 0xFF for byte in data[:16]) + data[16:]


def test_an_object_corrupted_at_the_same_size_is_refused(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    assert seeder.run("sync", NAME, "r1").returncode == 0
    v2 = make_model(tmp_path / "v2", "v2")
    bucket.put_folder(v2, NAME, "r2")
    good = (v2 / "unet" / "part1.safetensors").read_bytes()
    bucket.put(f"models/{NAME}/r2/unet/part1.safetensors", _same_size_other_bytes(good))

    outcome = seeder.run("sync", NAME, "r2")

    assert outcome.returncode == 1
    (error,) = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert "manifest mismatch: " in error
    assert "/r2/unet/part1.safetensors has sha256 " in error
    paths = _paths(seeder)
    assert paths.current_revision() == "r1"
    # Refused as it arrived: the bad bytes never took the file's name in staging.
    assert not (paths.staging("r2") / "unet" / "part1.safetensors").exists()
    assert not (paths.staging("r2") / "unet" / "part1.safetensors.part").exists()


def test_a_staged_file_corrupted_at_the_same_size_is_fetched_again(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path
) -> None:
    v1 = make_model(tmp_path / "v1", "v1")
    bucket.put_folder(v1, NAME, "r1")
    good = (v1 / "unet" / "part0.safetensors").read_bytes()
    staged = _paths(seeder).staging("r1") / "unet" / "part0.safetensors"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(_same_size_other_bytes(good))  # an earlier run's file, rotted since

    outcome = seeder.run("sync", NAME, "r1")

    assert outcome.returncode == 0, outcome.stderr
    assert outcome.result["downloaded_bytes"] == Manifest.build(v1, source="t").total_bytes
    assert (_paths(seeder).resolve_current() / "unet" / "part0.safetensors").read_bytes() == good


def test_a_staging_folder_hard_linked_to_the_live_release_never_writes_into_it(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    assert seeder.run("sync", NAME, "r1").returncode == 0
    paths = _paths(seeder)
    live = paths.release("r1")
    before = {p.relative_to(live).as_posix(): p.read_bytes() for p in live.rglob("*") if p.is_file()}
    # `cp -al releases/r1 .staging-r2`: a well-meant head start that shares every inode with r1.
    subprocess.run(["cp", "-al", str(live), str(paths.staging("r2"))], check=True)
    bucket.put_folder(make_model(tmp_path / "v2", "v2"), NAME, "r2")  # same model_index.json as r1

    outcome = seeder.run("sync", NAME, "r2")

    assert outcome.returncode == 0, outcome.stderr
    assert {p.relative_to(live).as_posix(): p.read_bytes() for p in live.rglob("*") if p.is_file()} == before
    verify_release(live)
    assert paths.current_revision() == "r2"
    shared = [p for p in paths.release("r2").rglob("*") if p.is_file() and p.stat().st_nlink != 1]
    assert shared == []  # nothing of r2 is also r1's, so fixing r2's modes never touches r1


def test_a_folder_left_where_the_manifest_now_has_a_file_is_cleaned(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    leftover = _paths(seeder).staging("r1") / "unet" / "part0.safetensors"
    (leftover / "old").mkdir(parents=True)  # an earlier attempt's upload had a folder by that name
    (leftover / "old" / "x.safetensors").write_bytes(b"x")
    (_paths(seeder).staging("r1") / "text_encoder").mkdir()  # and a folder this manifest has no use for

    outcome = seeder.run("sync", NAME, "r1")

    assert outcome.returncode == 0, outcome.stderr
    release = _paths(seeder).resolve_current()
    verify_release(release)
    assert (release / "unet" / "part0.safetensors").is_file()
    assert not (release / "text_encoder").exists()


BAD_ENTRIES = {
    "nul": ({"path": "unet/a\x00b.safetensors", "size": 1, "sha256": "0" * 64}, "unsafe path in manifest"),
    "sha": ({"path": "unet/x.safetensors", "size": 1, "sha256": "ABC"}, "is not 64 lowercase hex digits"),
    "size": (
        {"path": "unet/x.safetensors", "size": -5, "sha256": "0" * 64},
        "is not a whole number of bytes",
    ),
}


def _with_bad_entry(folder: Path, entry: dict[str, object]) -> bytes:
    """The folder's manifest with one bad entry last: every file before it is a valid download."""
    manifest = json.loads(Manifest.build(folder, source="t").to_json())
    manifest["files"].append(entry)
    return json.dumps(manifest).encode()


@pytest.mark.parametrize("case", [*BAD_ENTRIES, "not-utf8"])
def test_a_bad_manifest_is_one_line_before_any_download(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path, case: str
) -> None:
    folder = make_model(tmp_path / "v1", "v1")
    bucket.put_folder(folder, NAME, "r1")
    if case == "not-utf8":
        manifest, message = (
            b'{"files": [], "source": "\xff"}',
            "malformed manifest: 'utf-8' codec can't decode",
        )
    else:
        entry, message = BAD_ENTRIES[case]
        manifest = _with_bad_entry(folder, entry)
    bucket.put(f"models/{NAME}/r1/manifest.json", manifest)

    outcome = seeder.run("sync", NAME, "r1")

    assert outcome.returncode == 1
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    (error,) = errors
    assert message in error, outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert not _paths(seeder).staging("r1").exists()  # refused before a byte was downloaded


@pytest.mark.parametrize("revision", ["v2\n", "v2\r", "../v2"])
def test_a_revision_name_ending_in_a_newline_is_refused(seeder: SeederProgram, revision: str) -> None:
    outcome = seeder.run("sync", NAME, revision)

    assert outcome.returncode == 1
    assert "error: invalid revision" in outcome.stderr
    assert list(seeder.mount.iterdir()) == []


# --- progress, for the driver's probes -------------------------------------------------------------------


def test_the_progress_file_follows_the_sync_to_the_end(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    progress = tmp_path / "run" / "sd-lambda-sync" / "one-run.json"  # the seeder's /run, here a temp folder
    outcome = seeder.run("sync", NAME, "r1", "--progress-file", str(progress))
    assert outcome.returncode == 0, outcome.stderr
    total = outcome.result["downloaded_bytes"]
    assert json.loads(progress.read_text()) == {
        "phase": "done",
        "bytes_done": total,
        "bytes_total": total,
        "files_done": 4,  # model_index.json and three weights
        "files_total": 4,
    }
    assert stat.S_IMODE(progress.parent.stat().st_mode) == 0o700
    assert [p.name for p in progress.parent.iterdir()] == ["one-run.json"]  # no temporary left behind
    assert (
        describe_sync(progress.read_text())
        == f"sync: {total / 1000:.1f}/{total / 1000:.1f} kB, 4/4 files, done"
    )


def test_a_progress_file_that_cannot_be_written_never_fails_the_sync(
    seeder: SeederProgram, bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put_folder(make_model(tmp_path / "v1", "v1"), NAME, "r1")
    (tmp_path / "not-a-folder").write_text("")
    outcome = seeder.run("sync", NAME, "r1", "--progress-file", str(tmp_path / "not-a-folder" / "p.json"))
    assert outcome.returncode == 0, outcome.stderr
    assert _paths(seeder).current_revision() == "r1"
    notes = [line for line in outcome.stderr.splitlines() if line.startswith("progress file ")]
    assert len(notes) == 1
    assert notes[0].endswith("the sync goes on without it")


def test_a_download_reports_the_bytes_arrived_while_the_aws_cli_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in AWS CLI writes 100 bytes under a temporary name beside its destination, as the real one
    does, then blocks until the test has seen them arrive (a FIFO: no timing involved)."""
    from sd_lambda.layout import ManifestEntry
    from sd_lambda.seeding import efs_sync

    release = tmp_path / "release"
    os.mkfifo(release)
    payload = b"w" * 250
    cli = tmp_path / "aws"
    cli.write_text(
        "#!/usr/bin/env python3\n"
        "import os, sys\n"
        "destination = sys.argv[4]\n"
        "temporary = destination + '.a1B2c3'\n"
        "with open(temporary, 'wb') as out:\n"
        f"    out.write({payload[:100]!r})\n"
        "    out.flush()\n"
        f"    open({str(release)!r}).close()\n"
        f"    out.write({payload[100:]!r})\n"
        "os.replace(temporary, destination)\n"
    )
    cli.chmod(0o755)
    entry = ManifestEntry(
        path="unet/w.safetensors", size=len(payload), sha256=hashlib.sha256(payload).hexdigest()
    )
    target = tmp_path / "staging" / "w.safetensors"
    target.parent.mkdir()
    heard: list[int] = []
    released = threading.Lock()

    def let_it_finish() -> None:
        if released.acquire(blocking=False):
            with open(release, "w"):
                pass

    def on_bytes(count: int) -> None:
        heard.append(count)
        if count == 100:
            let_it_finish()

    monkeypatch.setattr(efs_sync, "PROGRESS_EVERY_S", 0.01)
    # Never hangs: without progress calls, the stand-in is let go after a minute, and the test fails.
    fallback = threading.Timer(60, let_it_finish)
    fallback.start()
    try:
        efs_sync.fetch(
            efs_sync.AwsCli(str(cli), "weights"), "models/m/r1/unet/w.safetensors", target, entry, on_bytes
        )
    finally:
        fallback.cancel()
    assert target.read_bytes() == payload
    assert 100 in heard
    assert set(heard) <= {0, 100, len(payload)}  # nothing else ever arrived


def test_bytes_in_flight_count_the_cli_temporary_files_up_to_the_size(tmp_path: Path) -> None:
    from sd_lambda.seeding.efs_sync import in_flight

    part = tmp_path / "w.safetensors.part"
    assert in_flight(part, 10) == 0
    (tmp_path / "w.safetensors.part.a1B2c3").write_bytes(b"x" * 6)
    (tmp_path / "other.safetensors.part.d4E5f6").write_bytes(b"x" * 50)  # another file's download
    assert in_flight(part, 10) == 6
    (tmp_path / "w.safetensors.part.g7H8i9").write_bytes(b"x" * 50)  # sparse ranges can overshoot
    assert in_flight(part, 10) == 10
