"""image/Dockerfile and .dockerignore say what the image must be (no Docker engine needed to read them)."""

from __future__ import annotations

import json
import re

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

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


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
    assert len(lock_installs) == 2
    assert all("--require-hashes" in command for command in lock_installs)
    assert "torch.version.cuda is None" in install
    assert "cu1" not in DOCKERFILE.read_text()  # no CUDA wheel index anywhere
    assert "pip check" in install


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
