"""The runtime comparison runs both OpenVINO runtimes on a real release, each in its own venv."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_lambda.devtools import openvino_runtimes


def test_both_runtimes_report_every_measure(
    tiny_openvino_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert openvino_runtimes.main([str(tiny_openvino_model_dir), "--side", "64", "--steps", "1"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["runtime"] for r in reports] == ["genai", "optimum"]
    for report in reports:
        assert set(report) == {"runtime", "import_s", "load_compile_s", "first_image_s", "peak_rss_mb"}, (
            report
        )
        assert report["peak_rss_mb"] > 0
