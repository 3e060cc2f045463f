"""The init's background read of the model's weights and where the handler starts it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release

from sd_lambda.engine import cpu
from sd_lambda.engine.accel import prefetch as prefetch_module
from sd_lambda.engine.accel import registry
from sd_lambda.engine.accel.bf16_copy import add_bf16_copy
from sd_lambda.engine.accel.prefetch import (
    Prefetch,
    WeightPrefetch,
    expects_bf16_copy,
    memory_available,
    prefetch_current,
    prefetch_model,
    weight_files,
)
from sd_lambda.engine.torch_engine import Engine
from sd_lambda.layout import BF16_COPY_COMPONENTS
from sd_lambda.serving.predictor import Predictor
from sd_lambda.settings import Settings

WAIT_SECONDS = 60


def _meminfo(tmp_path: Path, available_kib: int) -> Path:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {available_kib} kB\n")
    return meminfo


def test_weight_files_are_the_engines_safetensors_in_the_order_it_touches_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, symlinks=True)
    (model / "safety_checker").mkdir()
    (model / "safety_checker" / "model.safetensors").write_bytes(b"never loaded")
    files = weight_files(model)
    assert [path.parent.name for path in files] == ["text_encoder", "vae", "vae_tiny", "unet"]
    assert all(path.suffix == ".safetensors" for path in files)
    # A symlinked component (the bench's LCM view) is followed.
    view = tmp_path / "view"
    view.mkdir()
    (view / "unet").symlink_to(model / "unet")
    assert weight_files(view) == [view / "unet" / files[-1].name]


def test_with_a_bf16_copy_the_prefetch_reads_the_copy_only_where_bf16_runs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    release = seed_release(root, TEST_MODEL_NAME, TEST_REVISION, tiny_model_dir).release(TEST_REVISION)
    stored = weight_files(release)
    add_bf16_copy(release)
    assert weight_files(release) == stored  # the copy is never read as well as the stored weights
    copied = weight_files(release, bf16=True)
    assert [path.parent.name for path in copied] == ["text_encoder", "vae", "vae_tiny", "unet"]
    assert [path.name.endswith(".bf16.safetensors") for path in copied] == [True, True, False, True]
    bf16 = Settings(
        model_root=root, model_name=TEST_MODEL_NAME, dtype="bfloat16", accel="+bf16_copy,+prefetch"
    )
    prefetch = prefetch_current(bf16)
    assert prefetch is not None
    assert prefetch.wait(WAIT_SECONDS)
    assert prefetch.files == copied
    fp32 = Settings(
        model_root=root, model_name=TEST_MODEL_NAME, dtype="float32", accel="+bf16_copy,+prefetch"
    )
    stored_prefetch = prefetch_current(fp32)
    assert stored_prefetch is not None
    assert stored_prefetch.wait(WAIT_SECONDS)
    assert stored_prefetch.files == stored
    # An incomplete copy is not used by the engine, so it is not read either.
    next((release / BF16_COPY_COMPONENTS[0]).glob("*.bf16.safetensors")).unlink()
    assert weight_files(release, bf16=True) == stored


@pytest.mark.parametrize(
    ("environ", "flags", "expected"),
    [
        ({"SD_DTYPE": "bfloat16", "SD_ACCEL": "+bf16_copy"}, set(), True),
        ({"SD_DTYPE": "float32", "SD_ACCEL": "+bf16_copy"}, {"avx512_bf16"}, False),
        ({"SD_DTYPE": "bfloat16"}, {"avx512_bf16"}, False),  # opt-in: not in the defaults
        ({"SD_ACCEL": "+bf16_copy"}, {"avx512f", "avx512_bf16"}, True),
        ({"SD_ACCEL": "+bf16_copy"}, {"avx2", "avx512f"}, False),
        ({"SD_ACCEL": "+bf16_copy", "ATEN_CPU_CAPABILITY": "avx2"}, {"avx512f", "avx512_bf16"}, False),
    ],
)
def test_expects_bf16_copy_follows_the_setting_then_the_cpu(
    environ: dict[str, str], flags: set[str], expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu, "read_cpu_flags", lambda: frozenset(flags))
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert expects_bf16_copy(Settings.from_env(environ)) is expected


def test_prefetch_reads_every_byte_in_the_background(tiny_model_dir: Path) -> None:
    prefetch = prefetch_model(tiny_model_dir)
    assert prefetch.wait(WAIT_SECONDS)
    described = prefetch.describe()
    expected = sum(path.stat().st_size for path in weight_files(tiny_model_dir))
    assert described["state"] == "done"
    assert described["files"] == 4
    assert described["bytes"] == described["read_bytes"] == expected
    assert "reason" not in described


def test_without_sendfile_to_a_file_the_prefetch_reads_through_a_buffer(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_sendfile(*args: object) -> int:
        raise OSError(errno.EINVAL, "sendfile needs a socket here")

    monkeypatch.setattr(os, "sendfile", no_sendfile)
    prefetch = prefetch_model(tiny_model_dir)
    assert prefetch.wait(WAIT_SECONDS)
    assert prefetch.state == "done"
    assert prefetch.bytes_read == prefetch.total_bytes > 0


def test_prefetch_is_skipped_when_the_weights_would_not_fit_in_memory(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    total = sum(path.stat().st_size for path in weight_files(tiny_model_dir))
    roomy = prefetch_model(tiny_model_dir, _meminfo(tmp_path, available_kib=4 * total // 1024 + 1))
    assert roomy.wait(WAIT_SECONDS)
    assert roomy.state == "done"
    tight = prefetch_model(tiny_model_dir, _meminfo(tmp_path, available_kib=total // 1024))
    assert tight._thread is None  # never started
    described = tight.describe()
    assert (described["state"], described["read_bytes"]) == ("skipped", 0)
    assert "available" in described["reason"]


def test_memory_available_reads_meminfo_and_tolerates_its_absence(tmp_path: Path) -> None:
    assert memory_available(_meminfo(tmp_path, available_kib=2048)) == 2048 * 1024
    assert memory_available(tmp_path / "missing") is None
    (tmp_path / "odd").write_text("MemAvailable: lots\n")
    assert memory_available(tmp_path / "odd") is None


def test_an_unreadable_file_ends_the_pass_with_its_name_and_no_exception(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    readable = tmp_path / "a.safetensors"
    readable.write_bytes(b"x" * 1000)
    missing = tmp_path / "gone.safetensors"
    never_reached = tmp_path / "z.safetensors"
    never_reached.write_bytes(b"y" * 10)
    prefetch = WeightPrefetch([readable, missing, never_reached]).start()
    assert prefetch.wait(WAIT_SECONDS)
    described = prefetch.describe()
    assert described["state"] == "failed"
    assert described["read_bytes"] == 1000
    assert "gone.safetensors" in described["reason"]


def test_describe_while_the_pass_is_reading_and_after(tmp_path: Path) -> None:
    # A FIFO holds the reader until the test writes: a pass that is reading, without sleeps.
    fifo = tmp_path / "arriving.safetensors"
    os.mkfifo(fifo)
    prefetch = WeightPrefetch([fifo]).start()
    assert prefetch.state == "reading"
    assert not prefetch.wait(0)
    with open(fifo, "wb") as writer:
        writer.write(b"x" * 1000)
    assert prefetch.wait(WAIT_SECONDS)
    described = prefetch.describe()
    assert (described["state"], described["read_bytes"]) == ("done", 1000)
    # describe() rounds to milliseconds, and the whole pass can take less than half of one.
    assert prefetch.seconds > 0
    assert described["seconds"] == round(prefetch.seconds, 3)


def test_a_cancelled_prefetch_stops_reading(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 100)
    prefetch = WeightPrefetch([weights])
    prefetch.cancel()
    assert prefetch.state == "not started"
    assert prefetch.start().wait(WAIT_SECONDS)
    assert (prefetch.state, prefetch.bytes_read) == ("cancelled", 0)


def test_prefetch_current_reads_the_current_release_only_when_selected(
    model_root: Path, tmp_path: Path
) -> None:
    seeded = {"MODEL_ROOT": str(model_root), "MODEL_NAME": TEST_MODEL_NAME}
    prefetch = prefetch_current(Settings.from_env({**seeded, "SD_ACCEL": "+prefetch"}))
    assert prefetch is not None
    assert prefetch.wait(WAIT_SECONDS)
    release = model_root / TEST_MODEL_NAME / "releases" / TEST_REVISION
    assert prefetch.files == weight_files(release)
    assert prefetch.state == "done"
    # The same seeded model without it selected: opt-in, so the defaults and a list without it read nothing.
    for accel in ("default", "in_place,page_release"):
        assert prefetch_current(Settings.from_env({**seeded, "SD_ACCEL": accel})) is None, accel
    # Not seeded yet: nothing to read; the first request reports model_not_seeded as before.
    empty = Settings(model_root=tmp_path / "empty", model_name=TEST_MODEL_NAME, accel="+prefetch")
    assert prefetch_current(empty) is None


def test_the_engine_reports_prefetch_only_where_this_process_started_one(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefetch_module, "STARTED", {})
    target = registry.Target(tiny_model_dir, dtype=None, selected=frozenset({"prefetch"}))
    # The handler's init found nothing seeded (or the bench's engine ran without one): none started.
    assert "nothing seeded" in (Prefetch.check(target) or "")
    # Set up but skipped: the weights would take over half of MemAvailable.
    skipped = prefetch_model(tiny_model_dir, meminfo=_meminfo(tmp_path, available_kib=1))
    assert skipped.state == "skipped"
    assert Prefetch.check(target) == f"the init's prefetch was skipped: {skipped.skip_reason}"
    # Another release was read (current moved on since init): this one was not.
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other, symlinks=True)
    assert prefetch_model(other).wait(WAIT_SECONDS)
    assert Prefetch.check(target) is not None
    started = prefetch_model(tiny_model_dir)
    assert started.wait(WAIT_SECONDS)
    assert Prefetch.check(target) is None
    # The engine's load log and /health say the same.
    monkeypatch.setattr(prefetch_module, "STARTED", {})
    settings = Settings(dtype="float32", accel="+prefetch")
    described = Engine.load(tiny_model_dir, settings).describe()
    assert "prefetch" not in described["accelerations"]
    assert "nothing seeded" in described["skipped_accelerations"]["prefetch"]
    assert prefetch_model(tiny_model_dir).wait(WAIT_SECONDS)
    assert "prefetch" in Engine.load(tiny_model_dir, settings).describe()["accelerations"]


def test_health_reports_the_prefetch(model_root: Path) -> None:
    settings = Settings(model_root=model_root, model_name=TEST_MODEL_NAME, accel="+prefetch")
    prefetch = prefetch_current(settings)
    assert prefetch is not None
    assert prefetch.wait(WAIT_SECONDS)
    health = Predictor(settings, prefetch=prefetch).health()
    assert health["prefetch"]["state"] == "done"
    assert health["prefetch"]["read_bytes"] == prefetch.total_bytes > 0
    assert "prefetch" not in Predictor(settings).health()


def test_the_handler_starts_the_prefetch_before_it_imports_torch(model_root: Path) -> None:
    """The overlap is the point: by the time torch (then diffusers) is imported, the read has begun."""
    probe = textwrap.dedent(
        """
        import json, sys

        seen = {}

        class TorchWatch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" and "torch" not in seen:
                    handler = sys.modules.get("sd_lambda.serving.handler")
                    seen["torch"] = getattr(handler, "PREFETCH", None) is not None
                return None

        sys.meta_path.insert(0, TorchWatch())
        import sd_lambda.serving.handler as handler

        assert handler.PREFETCH.wait(60)
        print(json.dumps({"prefetch_before_torch": seen.get("torch"), **handler.PREFETCH.describe()}))
        """
    )
    env = {
        **os.environ,
        "MODEL_ROOT": str(model_root),
        "MODEL_NAME": TEST_MODEL_NAME,
        "SD_ACCEL": "+prefetch",
    }
    completed = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["prefetch_before_torch"] is True
    assert report["state"] == "done"
    assert report["read_bytes"] == report["bytes"] > 0


def test_a_listing_error_skips_the_prefetch_instead_of_failing_init(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stale(path: object) -> object:
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(os, "listdir", stale)
    prefetch = prefetch_model(tiny_model_dir)
    assert prefetch.state == "skipped"
    assert "Stale file handle" in prefetch.describe()["reason"]


def test_cancel_after_the_pass_keeps_it_done_and_cancel_mid_file_says_cancelled(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    finished = prefetch_model(tiny_model_dir)
    assert finished.wait(WAIT_SECONDS)
    finished.cancel()
    assert finished.state == "done"
    fifo = tmp_path / "half.safetensors"
    os.mkfifo(fifo)
    prefetch = WeightPrefetch([fifo]).start()
    with open(fifo, "wb") as writer:
        prefetch.cancel()  # the reader sees it before its next chunk, whatever it has read
        writer.write(b"x" * 10)
    assert prefetch.wait(WAIT_SECONDS)
    assert prefetch.state == "cancelled"


def test_the_predictor_cancels_a_prefetch_of_a_revision_current_no_longer_names(
    model_root: Path, tiny_model_dir: Path
) -> None:
    settings = Settings(model_root=model_root, model_name=TEST_MODEL_NAME, accel="+prefetch")
    fifo_release = model_root / "stale"
    (fifo_release / "unet").mkdir(parents=True)
    os.mkfifo(fifo_release / "unet" / "w.safetensors")
    # The test holds the FIFO's write end until the pass ends, so the reader's open() never blocks and
    # its read() waits for data: whether the thread got that far before the cancel or not, it ends.
    gate = os.open(fifo_release / "unet" / "w.safetensors", os.O_RDWR)
    stale = WeightPrefetch([fifo_release / "unet" / "w.safetensors"], folder=fifo_release).start()
    predictor = Predictor(settings, prefetch=stale)
    try:
        predictor.warm()
        os.write(gate, b"x")  # the reader's read() returns, and it sees the cancel
        assert stale.wait(WAIT_SECONDS)
    finally:
        os.close(gate)
    assert stale.state == "cancelled"
    current = prefetch_current(settings)
    assert current is not None
    assert current.wait(WAIT_SECONDS)
    Predictor(settings, prefetch=current).warm()
    assert current.state == "done"  # the revision it read is the one loaded
