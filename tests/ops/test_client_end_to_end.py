"""``sd-lambda generate`` against ``make serve``: the real handler behind the local function URL."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TEST_MODEL_NAME
from PIL import Image

from sd_lambda.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def make_serve(model_root: Path, tmp_path: Path) -> Iterator[str]:
    """``make serve`` on a free port with the tiny model; yields its URL once it says it is listening."""
    port = _free_port()
    process = subprocess.Popen(
        [
            "make",
            "-s",
            "--no-print-directory",
            "serve",
            f"PORT={port}",
            f"MODEL_DIR={model_root / TEST_MODEL_NAME}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "MAKEFLAGS": ""},
        start_new_session=True,  # its own process group: make, sd-lambda serve and awslambdaric stop together
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        while True:
            try:
                line = lines.get(timeout=STARTUP_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(
                    f"make serve did not start listening within {STARTUP_TIMEOUT_S} s:\n{''.join(seen)}"
                )
            if line is None:
                pytest.fail(f"make serve exited ({process.wait()}):\n{''.join(seen)}")
            seen.append(line)
            if line.startswith("listening"):
                break
        yield f"http://127.0.0.1:{port}/"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_generate_against_make_serve_writes_a_valid_png(
    make_serve: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The local front door does not check signatures, but the client signs every request regardless:
    # it needs credentials from the default chain and, for a 127.0.0.1 URL, an explicit region.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCALTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    out = tmp_path / "fox.png"
    args = ["generate", "--url", make_serve, "--region", "eu-west-1", "--prompt", "a red fox", "--steps", "2"]
    assert main([*args, "--seed", "11", "--width", "64", "--height", "64", "-o", str(out)]) == 0
    with Image.open(out) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size == (64, 64)
    printed = capsys.readouterr().out
    assert "seed 11" in printed
    assert "inference" in printed
    assert f"{TEST_MODEL_NAME}@r1" in printed

    # A request the function refuses is a one-line error with its own message, and is not retried.
    assert main([*args, "--width", "63", "-o", str(tmp_path / "bad.png")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("sd-lambda generate: error: HTTP 400: not_multiple: width must be a multiple of 8")
    assert not (tmp_path / "bad.png").exists()
