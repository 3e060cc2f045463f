"""`make install` takes torch's CPU build from PyTorch's CPU index when it answers, falls back to the default
index when it does not, and refuses a CUDA build; `make install-ops` installs no torch.

make runs the real recipes with PYTHON= a stand-in interpreter: it records every command, makes a venv
of itself, runs ``-c`` snippets (the index probe, the CUDA check) with the real interpreter and a stand-in
``torch`` module, and installs nothing.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sd_lambda.ops.container.requirements import ProjectDependencies

ROOT = Path(__file__).resolve().parents[2]
STAND_IN = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:2] == ["-m", "venv"]:
    (Path(args[2]) / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, Path(args[2]) / "bin" / "python")
elif args[:1] == ["-c"]:
    env = {{**os.environ, "PYTHONPATH": os.environ["STAND_IN_TORCH"]}}
    sys.exit(subprocess.run([{sys.executable!r}, *args], env=env).returncode)
"""


@pytest.fixture(scope="module")
def torch_spec() -> str:
    runtime = ProjectDependencies.from_pyproject(ROOT / "pyproject.toml").extra("runtime")
    (torch,) = [str(requirement) for requirement in runtime if requirement.name == "torch"]
    return torch


@pytest.fixture(scope="module")
def cpu_index() -> Iterator[str]:
    """A local stand-in for PyTorch's CPU index: answers 200 for /torch/."""

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/torch/" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


def make(
    tmp_path: Path, target: str, index_url: str, cuda: str | None = None
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    torch_dir = tmp_path / "stand-in-torch" / "torch"
    torch_dir.mkdir(parents=True)
    (torch_dir / "__init__.py").write_text(
        f"__version__ = '2.13.0+{'cu' + cuda.replace('.', '') if cuda else 'cpu'}'\n"
        f"class version:\n    cuda = {cuda!r}\n"
    )
    log = tmp_path / "commands.jsonl"
    env = {**os.environ, "STAND_IN_LOG": str(log), "STAND_IN_TORCH": str(torch_dir.parent)}
    command = ["make", "--no-print-directory", "-C", str(ROOT), target]
    command += [f"VENV={tmp_path / 'venv'}", f"PYTHON={python}", f"TORCH_INDEX_URL={index_url}"]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=120)
    commands = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return completed, commands


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    return [args[3:] for args in commands if args[:3] == ["-m", "pip", "install"]]


def test_install_takes_torch_from_the_cpu_index_when_it_answers(
    tmp_path: Path, cpu_index: str, torch_spec: str
) -> None:
    completed, commands = make(tmp_path, "install", cpu_index)
    assert completed.returncode == 0, completed.stderr
    installs = pip_installs(commands)
    assert installs[1] == ["--quiet", "--index-url", cpu_index, torch_spec]  # torch first, alone
    assert installs[2] == ["--quiet", "-e", ".[dev]"]
    assert "did not answer" not in completed.stderr
    assert (tmp_path / "venv" / ".stamp-install").exists()
    assert (tmp_path / "venv" / ".stamp-ops").exists()  # a full install serves the operator targets too


def test_install_falls_back_to_the_default_index(tmp_path: Path, torch_spec: str) -> None:
    unreachable = closed_port_url()
    completed, commands = make(tmp_path, "install", unreachable)
    assert completed.returncode == 0, completed.stderr
    assert pip_installs(commands)[1] == ["--quiet", torch_spec]
    notice = f"make install: {unreachable} did not answer; torch comes from the default index"
    assert notice in completed.stderr


def test_install_fails_loudly_on_a_cuda_torch(tmp_path: Path) -> None:
    completed, _ = make(tmp_path, "install", closed_port_url(), cuda="12.8")
    assert completed.returncode != 0
    assert "make install: torch 2.13.0+cu128 is a CUDA build" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "venv" / ".stamp-install").exists()  # the next make tries again


def test_install_ops_installs_no_torch(tmp_path: Path, cpu_index: str) -> None:
    completed, commands = make(tmp_path, "install-ops", cpu_index)
    assert completed.returncode == 0, completed.stderr
    assert pip_installs(commands)[1:] == [["--quiet", "-e", ".[ops]"]]
    assert not [args for args in commands if args[:1] == ["-c"]]  # no probe, no torch check
    assert (tmp_path / "venv" / ".stamp-ops").exists()
    assert not (tmp_path / "venv" / ".stamp-install").exists()


def test_requirements_resolves_against_the_same_cpu_index() -> None:
    dry_run = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-n",
            "-C",
            str(ROOT),
            "requirements",
            "TORCH_INDEX_URL=https://x/cpu",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"""requirements --torch-index-url ['"]https://x/cpu['"]""", dry_run)
    offline = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(ROOT), "requirements", "FIND_LINKS=/opt/wheels"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "requirements --find-links /opt/wheels" in offline
    assert "--torch-index-url" not in offline
