"""``SD_ACCEL=none sd-lambda demo``: the real Lambda entrypoint serves a request on stock diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sd_lambda.cli import main


def test_the_demo_serves_a_request_with_every_acceleration_off(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SD_ACCEL", "none")  # the function's process inherits the documented settings
    out = tmp_path / "demo.png"
    argv = ["demo", "--model-dir", str(tiny_model_dir), "--cache-dir", str(tmp_path), "-o", str(out)]
    assert main([*argv, "--steps", "1"]) == 0
    assert "warm" in capsys.readouterr().out
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    records = []
    for line in (tmp_path / "demo-lambda.log").read_text().splitlines():
        if line.startswith("{"):  # the function's JSON log lines, among the runtime's own output
            records.append(json.loads(line))
    messages = [str(record.get("message", "")) for record in records]
    assert "engine accelerations: none, stock diffusers (SD_ACCEL=none); load" in " ".join(messages)
    assert not [m for m in messages if m.startswith("engine acceleration ")]
    assert sum(record.get("outcome") == "ok" for record in records) == 2
