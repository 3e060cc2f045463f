"""``--json`` in a real process: stdout is exactly one JSON document, the human lines are on stderr.

In-process tests replace ``sys.stdout`` (capsys, capfd), which hides where file descriptor 1 points; these
run the console script (or a plain interpreter) so that stdout is a real pipe, as under ``| jq``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ops.sigv4_server import ACCESS_KEY, REGION, SECRET_KEY, Reply, SigV4Server

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).with_name("sd-lambda")
DEPLOY_STACK = ROOT / "tests" / "ops" / "fixtures" / "deploy_stack"
PNG = b"\x89PNG\r\n\x1a\nnot-really-decoded-by-the-client"


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=300, cwd=cwd, env=env or dict(os.environ)
    )


def one_document(completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("\n") == 1, f"stdout is not one line:\n{completed.stdout}"
    return json.loads(completed.stdout)


@pytest.fixture
def credentials(tmp_path: Path) -> dict[str, str]:
    """The environment of a process that signs with the test server's credentials and finds no others."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    return {
        **env,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def test_generate_json_goes_to_stdout(credentials: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "cube.png"
    with SigV4Server() as server:
        server.replies.append(Reply(200, PNG, {"content-type": "image/png", "x-seed": "7"}))
        argv = ["generate", "--url", server.url, "--region", REGION, "--prompt", "a cube", "-o", str(image)]
        completed = run([str(CONSOLE_SCRIPT), *argv, "--json"], tmp_path, credentials)
    document = one_document(completed)
    assert (document["image"], document["seed"], document["bytes"]) == (str(image), 7, len(PNG))
    assert f"==> POST {server.url}" in completed.stderr
    assert image.read_bytes() == PNG


def test_deploy_plan_json_keeps_terraform_off_stdout(terraform_on_path: Path, tmp_path: Path) -> None:
    stack = tmp_path / "stack"
    shutil.copytree(DEPLOY_STACK, stack)
    argv = ["deploy", "plan", "--infra", str(stack), "--digest-file", str(tmp_path / "none"), "--json"]
    completed = run([str(CONSOLE_SCRIPT), *argv], tmp_path)
    document = one_document(completed)
    assert document == {
        "image_uri": None,
        "changes": [{"address": "terraform_data.repository", "actions": ["create"]}],
    }
    assert "planning without the function" in completed.stderr
    assert "Plan: 1 to add" in completed.stderr  # terraform's own output, a child writing to descriptor 1


ROLLBACK = """\
import os, sys
from sd_lambda.cli import main
from sd_lambda.seeding import flow


def rollback(clients, target, name, revision, options, adapter=None):
    print("switching m to r1")  # the command's own line
    os.write(1, b"a child process on descriptor 1\\n")
    return {"model": name, "revision": revision, "previous": "r2", "releases": ["r1", "r2"]}


flow.AwsClients.create = staticmethod(lambda region: None)
flow.rollback = rollback
sys.exit(main(sys.argv[1:]))
"""


def test_rollback_json_goes_to_stdout(tmp_path: Path) -> None:
    stack = ["--bucket", "b", "--instance-id", "i-1", "--region", "eu-west-1"]
    argv = ["rollback", "--name", "m", "--revision", "r1", *stack, "--json"]
    completed = run([sys.executable, "-c", ROLLBACK, *argv], tmp_path)
    document = one_document(completed)
    assert document == {
        "model": "m",
        "revision": "r1",
        "previous": "r2",
        "releases": ["r1", "r2"],
        "current": "r1",
    }
    assert "switching m to r1\n" in completed.stderr
    assert "a child process on descriptor 1\n" in completed.stderr


def test_without_json_the_result_is_on_stdout(tmp_path: Path) -> None:
    stack = ["--bucket", "b", "--instance-id", "i-1", "--region", "eu-west-1"]
    completed = run(
        [sys.executable, "-c", ROLLBACK, "rollback", "--name", "m", "--revision", "r1", *stack], tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.endswith("m: current -> r1 (was r2); releases: r1, r2\n")
    assert completed.stderr == ""


def test_python_m_reports_a_command_error_in_one_line(tmp_path: Path) -> None:
    argv = ["generate", "--url", "http://127.0.0.1:1/", "--prompt", " "]
    completed = run([sys.executable, "-m", "sd_lambda.cli", *argv], tmp_path)
    assert completed.returncode == 1
    assert completed.stderr == 'sd-lambda generate: error: the prompt is empty: pass --prompt "a red fox"\n'
    assert completed.stdout == ""
