"""``sd-lambda seed`` / ``rollback``: stack outputs vs flags, and one-line errors with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sd_lambda.cli import main
from sd_lambda.seeding import target as target_module
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.target import Target, resolve_target

from .conftest import make_model

OUTPUTS = {
    "weights_bucket_name": "stack-weights",
    "weights_prefix": "models/",
    "seeder_instance_id": "i-0stack",
    "seeder_mount_path": "/mnt/models",
    "efs_access_point_arn": "arn:aws:elasticfilesystem:eu-west-1:1:access-point/fsap-1",
    "region": "eu-west-1",
    "model_name": "segmind--tiny-sd",
    "function_name": "sd",
}
NO_FLAGS = dict.fromkeys(target_module.OUTPUTS)


def test_outputs_fill_what_flags_do_not_give(tmp_path: Path) -> None:
    calls: list[Path] = []

    def outputs(infra_dir: Path) -> dict[str, Any]:
        calls.append(infra_dir)
        return OUTPUTS

    resolved = resolve_target({**NO_FLAGS, "bucket": "mine"}, tmp_path, outputs)
    assert resolved == Target(
        bucket="mine",
        instance_id="i-0stack",
        prefix="models/",
        mount_path="/mnt/models",
        region="eu-west-1",
        model_name="segmind--tiny-sd",
        function_name="sd",
    )
    assert calls == [tmp_path]
    assert resolved.revision_prefix("x", "r1") == "models/x/r1/"


def test_flags_alone_never_read_the_stack(tmp_path: Path) -> None:
    def outputs(infra_dir: Path) -> dict[str, Any]:
        raise AssertionError("terraform must not be asked")

    resolved = resolve_target({**NO_FLAGS, "bucket": "b", "instance_id": "i-1"}, tmp_path, outputs)
    assert (resolved.bucket, resolved.instance_id, resolved.mount_path) == ("b", "i-1", "/mnt/models")


def test_unreadable_stack_says_which_flags(tmp_path: Path) -> None:
    def outputs(infra_dir: Path) -> dict[str, Any]:
        raise RuntimeError("terraform is not on PATH")

    with pytest.raises(SeedError, match=r"terraform is not on PATH\); pass --bucket --instance-id"):
        resolve_target(NO_FLAGS, tmp_path, outputs)
    with pytest.raises(SeedError, match="pass --instance-id"):
        resolve_target(NO_FLAGS, tmp_path, lambda _: {**OUTPUTS, "seeder_instance_id": None})


def test_cli_reads_the_stack_through_stack_outputs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Path] = []

    def read_outputs(infra_dir: Path) -> dict[str, Any]:
        seen.append(infra_dir)
        return OUTPUTS

    import sd_lambda.ops.stack_outputs

    monkeypatch.setattr(sd_lambda.ops.stack_outputs, "read_outputs", read_outputs)
    # A folder that passes the local checks, seeded under a name the stack does not serve: refused from
    # the stack's model_name, before anything touches AWS.
    folder = make_model(tmp_path / "m", "v1")
    argv = ["seed", "--from-dir", str(folder), "--name", "acme/other", "--infra", str(tmp_path)]
    assert main(argv) == 1
    assert seen == [tmp_path]
    assert target_module.OUTPUTS["instance_id"][0] == "seeder_instance_id"


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


STACK = ["--bucket", "b", "--instance-id", "i-1", "--region", "eu-west-1"]


def test_one_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _error(capsys, ["seed", "--from-dir", str(empty), *STACK]) == (
        f"sd-lambda seed: error: {empty} is not a diffusers pipeline: no model_index.json"
    )
    pickled = make_model(tmp_path / "pickled", "v1")
    (pickled / "unet" / "model.ckpt").write_bytes(b"pickle")
    assert "pickle weights are refused (convert them to safetensors): unet/model.ckpt" in _error(
        capsys, ["seed", "--from-dir", str(pickled), *STACK]
    )
    assert "expected s3://<bucket>/<prefix>/<name>/<revision>/" in _error(
        capsys, ["seed", "--from-s3", "s3://b/only", *STACK]
    )
    assert "invalid revision '../x'" in _error(
        capsys, ["rollback", "--name", "m", "--revision", "../x", *STACK]
    )
    assert "--keep must be at least 1" in _error(
        capsys, ["seed", "--from-dir", str(empty), "--keep", "0", *STACK]
    )
    variant = ["seed", "--from-dir", str(empty), "--variant", "fp16", *STACK]
    assert "apply to --model (hub downloads) only" in _error(capsys, variant)
    from_s3 = ["seed", "--from-s3", "s3://b/models/m/r1/", "--revision", "r2", *STACK]
    assert "--from-s3 names the revision itself" in _error(capsys, from_s3)
    copy_of_s3 = ["seed", "--from-s3", "s3://b/models/m/r1/", "--bf16-copy", *STACK]
    assert "--bf16-copy applies to --model and --from-dir" in _error(capsys, copy_of_s3)
    unet_only = ["seed", "--from-dir", str(make_model(tmp_path / "unet-only", "v1")), "--bf16-copy", *STACK]
    assert "--bf16-copy: text_encoder/ needs exactly one unsharded weights file" in _error(capsys, unet_only)
    warm = ["seed", "--from-dir", str(empty), "--warm", *STACK]
    assert "--warm needs --function-name" in _error(capsys, warm)


def test_bootstrap_script_is_the_same_command(tmp_path: Path) -> None:
    script = Path(__file__).parents[2] / "scripts" / "bootstrap_efs.py"
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), "--from-dir", str(empty), *STACK],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"sd-lambda seed: error: {empty} is not a diffusers pipeline: no model_index.json"
    )


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).parents[2]
    # -o: never (re)build the venv from a test; it is there, the suite runs in it.
    command = ["make", "--no-print-directory", "-s", "-o", ".venv/.stamp-install", *args]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)


def test_make_targets_reach_the_cli(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    stack = "SEED_ARGS=--bucket b --instance-id i-1 --region eu-west-1"
    done = _make("seed-models", f"FROM_DIR={empty}", "MODEL=acme/tiny-sd", stack)
    assert done.returncode != 0
    assert f"sd-lambda seed: error: {empty} is not a diffusers pipeline: no model_index.json" in done.stderr
    dry = _make("-n", "seed-models", "MODEL=acme/tiny-sd@main", "REVISION=r1")
    assert "--model 'acme/tiny-sd@main'" in dry.stdout
    assert "--revision 'r1'" in dry.stdout
    assert "--infra 'infra'" in dry.stdout
    assert "--bf16-copy" not in dry.stdout
    copy = _make("-n", "seed-models", "MODEL=acme/tiny-sd", "BF16_COPY=1")
    assert "--model 'acme/tiny-sd'" in copy.stdout
    assert "--bf16-copy" in copy.stdout
    usage = _make("rollback", "MODEL=acme/tiny-sd", stack)
    assert usage.returncode != 0
    assert 'sd-lambda rollback: error: no release to switch to: set REVISION="<release>"' in usage.stderr
    dry = _make("-n", "rollback", "MODEL=acme/tiny-sd", "REVISION=r1")
    # deploy rollback hands an EFS stack's rollback to `sd-lambda rollback` with the words after --.
    words = " ".join(dry.stdout.replace("\\\n", " ").split())
    assert "sd-lambda deploy rollback --infra 'infra'" in words
    assert "-- --name 'acme/tiny-sd'" in words
    assert "--revision 'r1'" in dry.stdout


def test_make_passes_export_and_quantize_and_needs_the_export_venv_only_for_an_export(tmp_path: Path) -> None:
    export_venv = ["-o", ".venv-export/.stamp-export"]  # never (re)build it from a test either
    dry = _make(*export_venv, "-n", "seed-models", "MODEL=acme/tiny-sd", "EXPORT=openvino", "QUANTIZE=int8")
    words = " ".join(dry.stdout.replace("\\\n", " ").split())
    assert "--export 'openvino' --export-python '.venv-export/bin/python'" in words
    assert "--quantize 'int8'" in words
    plain = " ".join(_make("-n", "seed-models", "MODEL=acme/tiny-sd").stdout.split())
    assert "--export" not in plain
    assert "--quantize" not in plain

    def prerequisites(*assignments: str) -> list[str]:
        database = _make("-p", "-n", "help", *assignments).stdout.splitlines()
        return next(line for line in database if line.startswith("seed-models: ")).split()[1:]

    assert prerequisites() == [".venv/.stamp-ops"]
    assert prerequisites("EXPORT=openvino") == [".venv/.stamp-ops", ".venv-export/.stamp-export"]
    # From make, a refusal names the make variables.
    model = make_model(tmp_path / "m", "v1")
    stack = "SEED_ARGS=--bucket b --instance-id i-1 --region eu-west-1"
    refused = _make("seed-models", f"FROM_DIR={model}", "QUANTIZE=int8", stack)
    assert refused.returncode != 0
    assert 'sd-lambda seed: error: QUANTIZE= applies to an export: set EXPORT="openvino"' in refused.stderr
