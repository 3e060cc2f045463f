"""image/Dockerfile and .dockerignore say what the image must be (no Docker engine needed to read them)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from image.dockerfile import (
    DOCKERFILE,
    ROOT,
    Stage,
    dockerignore_admits,
    lay_out_package_source,
    package_copies,
    parse_dockerfile,
)
from image.dockerfile import ignore_patterns as read_ignore_patterns
from sd_lambda.layout import ENGINES
from sd_lambda.ops.container.docker import DEFAULT_ENGINE, ENGINE_BUILD_ARG
from sd_lambda.ops.container.requirements import TORCH_STACK

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The locks each variant's build installs, in order (the torch image's torch first, from its own index).
VARIANT_LOCKS = {
    "torch": ["/tmp/requirements-torch.txt", "/tmp/requirements.txt"],
    "openvino": ["/tmp/requirements-openvino.txt"],
}


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_base_is_slim_python_311_pinned_by_digest_build_arg(dockerfile) -> None:
    global_args, stages = dockerfile
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", global_args["BASE_DIGEST"])
    assert [stage.base for stage in stages] == ["python:3.11-slim-bookworm@${BASE_DIGEST}"] * len(stages)


def test_multi_stage_and_the_runtime_stage_installs_nothing(dockerfile) -> None:
    _, stages = dockerfile
    assert len(stages) >= 2
    runtime = stages[-1]
    runs = " ".join(runtime.all("RUN"))
    for tool in ("pip install", "python -m pip", "apt-get", "gcc", "make ", "curl", "wget"):
        assert tool not in runs, f"the runtime stage must not run {tool.strip()}"
    assert runtime.all("COPY") == [f"--from={stages[0].name} /opt/venv /opt/venv"]
    # The base image's own pip goes too: nothing in the runtime image can install packages.
    assert "rm -rf /usr/local/bin/pip " in runs
    assert "/usr/local/lib/python3.11/site-packages/pip " in runs
    assert "/usr/local/lib/python3.11/ensurepip" in runs


def test_torch_comes_from_the_cpu_index_and_the_lock_is_installed_without_resolving(dockerfile) -> None:
    _, stages = dockerfile
    build = stages[0]
    assert f"TORCH_INDEX_URL={CPU_INDEX}" in build.all("ARG")
    install = " ".join(build.all("RUN"))
    assert '--index-url "${TORCH_INDEX_URL}" -r /tmp/requirements-torch.txt' in install
    assert "--only-binary=:all: -r /tmp/requirements.txt" in install
    assert all("--no-deps" in run for run in build.all("RUN") if "pip install" in run)
    lock_installs = re.findall(r"pip install [^&]*-r /tmp/\S+", install)
    assert len(lock_installs) == sum(map(len, VARIANT_LOCKS.values()))
    assert all("--require-hashes" in command for command in lock_installs)
    assert "torch.version.cuda is None" in install
    assert "cu1" not in DOCKERFILE.read_text()  # no CUDA wheel index anywhere
    assert "pip check" in install


def test_the_engine_build_arg_reaches_both_stages(dockerfile) -> None:
    global_args, stages = dockerfile
    assert global_args[ENGINE_BUILD_ARG] == DEFAULT_ENGINE
    # An ARG before FROM is visible only to FROM lines: each stage that reads it declares it again, with
    # no value of its own, so the one default (or --build-arg) holds in both.
    for stage in stages:
        assert ENGINE_BUILD_ARG in stage.all("ARG"), stage.name
    labels = " ".join(stages[-1].all("LABEL"))
    assert "${ENGINE} engine" in labels  # the image says which variant it is


def _run_variant_install(dockerfile, tmp_path, engine: str) -> tuple[subprocess.CompletedProcess[str], list]:
    """The build stage's install RUN under sh for ``engine``, with pip and python replaced by recorders:
    which commands the shell's dispatch runs for that ENGINE."""
    _, stages = dockerfile
    (install,) = [run for run in stages[0].all("RUN") if "requirements" in run]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / f"{engine}.log"
    for tool in ("pip", "python"):
        recorder = bin_dir / tool
        recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> "{log}"\n')
        recorder.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ENGINE": engine, "TORCH_INDEX_URL": CPU_INDEX}
    completed = subprocess.run(["sh", "-c", install], env=env, capture_output=True, text=True, check=False)
    return completed, log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_installs_its_own_locks(dockerfile, tmp_path, engine: str) -> None:
    completed, commands = _run_variant_install(dockerfile, tmp_path, engine)
    assert completed.returncode == 0, completed.stderr
    installs = [command for command in commands if command.startswith("pip install")]
    assert [command.split(" -r ")[1] for command in installs] == VARIANT_LOCKS[engine]
    assert all("--require-hashes --no-deps --only-binary=:all:" in command for command in installs)
    (check,) = [command for command in commands if command.startswith("python -c")]
    if engine == "torch":
        assert "--index-url " + CPU_INDEX in installs[0]
        assert "torch.version.cuda is None" in check
    else:
        # The venv's seeded setuptools goes before the lock installs: the venv holds exactly the lock.
        assert commands[0] == "pip uninstall --yes --quiet setuptools"
        assert "--index-url" not in " ".join(installs)  # PyPI only
        assert all(f"'{name}'" in check for name in TORCH_STACK)  # the build proves they are absent


def test_an_unknown_engine_stops_the_build(dockerfile, tmp_path) -> None:
    completed, commands = _run_variant_install(dockerfile, tmp_path, "tensorflow")
    assert completed.returncode != 0
    assert completed.stderr.strip() == "ENGINE=tensorflow: use torch or openvino"
    assert commands == []  # nothing installed: no default image under a wrong name


def test_package_is_installed_without_extras(dockerfile) -> None:
    _, stages = dockerfile
    package_installs = [run for run in stages[0].all("RUN") if "/tmp/sd-lambda" in run]
    assert package_installs
    assert not any("[" in run for run in package_installs)  # no ".[ops]" / ".[dev]"
    # The console script's module (cli.py) is not copied: its launcher goes with it.
    assert "pip install --no-deps /tmp/sd-lambda && rm /opt/venv/bin/sd-lambda &&" in package_installs[0]


def test_only_the_runtime_part_of_the_package_is_copied(dockerfile, tmp_path) -> None:
    _, stages = dockerfile
    sources = [source for copies, _ in package_copies(stages[0]) for source in copies]
    assert "src" not in sources
    laid_out = lay_out_package_source(tmp_path)
    modules = {path.split("/")[2] for path in laid_out if path.startswith("src/sd_lambda/")}
    assert modules == {"__init__.py", "py.typed", "layout.py", "settings.py", "serving", "engine"}
    assert "src/sd_lambda/serving/handler.py" in laid_out
    assert "src/sd_lambda/engine/accel/upsample_fold.py" in laid_out
    assert not [path for path in laid_out if "__pycache__" in path or path.endswith(".pyc")]


def test_runs_as_non_root_with_the_lambda_entrypoint(dockerfile) -> None:
    _, stages = dockerfile
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users
    assert users[-1] not in ("root", "0", "0:0")
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ["python", "-m", "awslambdaric"]
    assert json.loads(runtime.all("CMD")[-1]) == ["sd_lambda.serving.handler.handler"]
    env = " ".join(runtime.all("ENV"))
    assert "HF_HUB_OFFLINE=1" in env
    assert "HF_HUB_DISABLE_PROGRESS_BARS=1" in env  # cold-start logs stay JSON lines
    assert "MODEL_ROOT" not in env  # the settings default is the one place it is declared
    assert "PYTHONSAFEPATH=1" in env  # the working directory never shadows the venv's packages


def test_healthcheck_skip_has_a_reason() -> None:
    skips = re.findall(r"checkov:skip=(CKV\w+):(.+)", DOCKERFILE.read_text())
    assert skips == [(skips[0][0], skips[0][1])]
    assert skips[0][0] == "CKV_DOCKER_2"
    assert "Lambda ignores HEALTHCHECK" in skips[0][1]


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    return read_ignore_patterns()


def test_build_context_holds_what_the_dockerfile_copies(dockerfile, ignore_patterns) -> None:
    _, stages = dockerfile
    sources = [
        source
        for stage in stages
        for copy in stage.all("COPY")
        if not copy.startswith("--from")
        for source in copy.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert dockerignore_admits(source, ignore_patterns), f"{source} is excluded from the build context"
    assert dockerignore_admits("src/sd_lambda/serving/handler.py", ignore_patterns)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        "models/test--tiny-sd/releases/r1/unet/diffusion_pytorch_model.safetensors",
        ".cache/demo/model.safetensors",
        "infra/terraform.tfstate",
        ".image-digest",
        "tests/conftest.py",
        ".git/config",
        "src/sd_lambda/__pycache__/handler.cpython-311.pyc",
        "src/sd_lambda.egg-info/PKG-INFO",
        # Operator and developer code never reaches the image.
        "src/sd_lambda/cli.py",
        "src/sd_lambda/ops/deploy.py",
        "src/sd_lambda/seeding/flow.py",
        "src/sd_lambda/devtools/bench.py",
    ],
)
def test_build_context_leaves_out_weights_state_and_caches(ignore_patterns, path: str) -> None:
    assert not dockerignore_admits(path, ignore_patterns)
