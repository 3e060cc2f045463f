"""The image's Python layer, proven without Docker.

A fresh venv gets exactly what image/Dockerfile installs: ``image/requirements.txt`` with ``--no-deps``
(so nothing unpinned and none of the ops/dev extras), then the package itself with ``--no-deps``, built
from the files the Dockerfile's COPY lines lay out (only its runtime part: no ops/, seeding/, devtools/
or cli.py). From
that venv, ``python -m awslambdaric sd_lambda.serving.handler.handler`` (the image's ENTRYPOINT + CMD)
serves a real invocation from the local Lambda Runtime API with the tiny model. The venv's installed size,
plus the base image, is checked against the 1.5 GB image budget.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TEST_MODEL_NAME
from PIL import Image

from image.dockerfile import lay_out_package_source
from sd_lambda.devtools.local.launcher import LocalLambda
from sd_lambda.ops.container.requirements import parse, unsupported_via

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "image" / "requirements.txt"
TORCH_LOCK = ROOT / "image" / "requirements-torch.txt"
# python:3.11-slim-bookworm, uncompressed (linux/amd64): about 125 MB on Docker Hub's listing; counted
# generously here because no Docker engine is available to measure it.
BASE_IMAGE_ESTIMATE_BYTES = 160_000_000
IMAGE_BUDGET_BYTES = 1_500_000_000


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if completed.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return completed


def _isolated_env() -> dict[str, str]:
    """The parent's environment minus anything that could put the dev venv's packages on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image venv's python: requirements.txt + the package, both --no-deps, as in the Dockerfile."""
    venv = tmp_path_factory.mktemp("image-venv") / "venv"
    env = _isolated_env()
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "--quiet", "--no-deps"]
    # As the Dockerfile: torch in its own step, then PyPI; every file checked against the locks' hashes.
    _run([*pip, "--require-hashes", "--only-binary=:all:", "-r", str(TORCH_LOCK)], env=env)
    _run([*pip, "--require-hashes", "--only-binary=:all:", "-r", str(LOCK)], env=env)
    wheel_dir = tmp_path_factory.mktemp("image-wheel")
    # The package source exactly as the Dockerfile's COPY lines lay it out in /tmp/sd-lambda.
    source = tmp_path_factory.mktemp("image-package-source")
    lay_out_package_source(source)
    _run(
        [str(python), "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheel_dir), str(source)],
        env=env,
    )
    _run([*pip, *map(str, wheel_dir.glob("sd_lambda-*.whl"))], env=env)
    (venv / "bin" / "sd-lambda").unlink()  # as the Dockerfile: its cli.py is not in the image
    _run([str(python), "-m", "pip", "check"], env=env)
    return python


def test_venv_holds_exactly_the_lock_and_the_package(image_python: Path) -> None:
    listed = _run([str(image_python), "-m", "pip", "list", "--format=json"], env=_isolated_env()).stdout
    installed = {item["name"].lower().replace("_", "-"): item["version"] for item in json.loads(listed)}
    expected = {
        entry.name: entry.version for entry in [*parse(LOCK.read_text()), *parse(TORCH_LOCK.read_text())]
    }
    assert installed.pop("sd-lambda") == "0.1.0"
    installed.pop("pip")
    assert installed == expected
    assert "boto3" not in installed
    assert "pytest" not in installed


def test_lock_provenance_matches_the_installed_metadata(image_python: Path) -> None:
    """Each ``# via`` claim is backed by the Requires-Dist of the version actually installed."""
    script = (
        "import json, importlib.metadata as m, sys\n"
        "from packaging.markers import default_environment\n"
        "from packaging.utils import canonicalize_name as c\n"
        "print(json.dumps({'env': default_environment(), 'requires': "
        "{c(d.metadata['Name']): d.requires or [] for d in m.distributions()}}))\n"
    )
    report = json.loads(_run([str(image_python), "-c", script], env=_isolated_env()).stdout)
    locked = [*parse(LOCK.read_text()), *parse(TORCH_LOCK.read_text())]
    assert unsupported_via(locked, report["requires"], report["env"]) == []


def test_the_image_holds_no_operator_or_developer_code(image_python: Path, tmp_path: Path) -> None:
    script = (
        "import importlib, importlib.util, json, pkgutil, sd_lambda\n"
        "names = [m.name for m in pkgutil.walk_packages(sd_lambda.__path__, 'sd_lambda.')]\n"
        "failed = {}\n"
        "for name in names:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed[name] = repr(exc)\n"
        "absent = ['sd_lambda.ops', 'sd_lambda.seeding', 'sd_lambda.devtools', 'sd_lambda.cli']\n"
        "found = [name for name in absent if importlib.util.find_spec(name) is not None]\n"
        "print(json.dumps({'modules': names, 'failed': failed, 'found': found}))\n"
    )
    env = {**_isolated_env(), "MODEL_ROOT": str(tmp_path)}
    report = json.loads(_run([str(image_python), "-c", script], cwd=tmp_path, env=env).stdout)
    assert report["found"] == []
    areas = {name.split(".")[1] for name in report["modules"]}
    assert areas == {"serving", "engine", "layout", "settings"}
    # Every module the image holds imports with what the image installs.
    assert report["failed"] == {}
    assert not (image_python.parent / "sd-lambda").exists()


def test_runtime_code_imports_only_what_the_image_installs(image_python: Path, tmp_path: Path) -> None:
    helper = Path(__file__).with_name("runtime_imports.py")
    completed = _run(
        [str(image_python), str(helper), "sd_lambda.serving.handler"], cwd=tmp_path, env=_isolated_env()
    )
    report = json.loads(completed.stdout)
    assert Path(report["package_dir"]).is_relative_to(image_python.parent.parent)  # not the repo's src/
    assert {"sd_lambda.serving.handler", "sd_lambda.serving.service", "sd_lambda.engine.torch_engine"} <= set(
        report["modules"]
    )
    # The walk in the image reaches every module the same walk reaches in the repository (where ops/,
    # seeding/ and devtools/ exist): the handler's code needs nothing the image left out.
    in_repository = json.loads(
        _run([sys.executable, str(helper), "sd_lambda.serving.handler"], cwd=tmp_path).stdout
    )
    assert report["modules"] == in_repository["modules"]
    missing = [name for name, importable in report["external"].items() if not importable]
    assert missing == [], (
        f"the Lambda's code imports {missing}, which image/requirements.txt does not install"
    )
    assert {"torch", "diffusers", "aws_lambda_powertools"} <= set(report["external"])


def test_awslambdaric_serves_the_handler_from_the_image_venv(
    image_python: Path, model_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The image's CMD, from a working directory that holds nothing importable (as /tmp in the image).
    monkeypatch.chdir(tmp_path)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "MODEL_ROOT": str(model_root),
        "MODEL_NAME": TEST_MODEL_NAME,
        "PYTHONNOUSERSITE": "1",
        "PYTHONSAFEPATH": "1",  # as the image sets it
        "HF_HUB_OFFLINE": "1",
    }
    log_path = tmp_path / "lambda.log"
    with LocalLambda(env, python=str(image_python), timeout_s=240, log_path=log_path) as function:
        assert function.command == [
            str(image_python),
            "-m",
            "awslambdaric",
            "sd_lambda.serving.handler.handler",
        ]
        result = function.invoke({"prompt": "a red cube", "seed": 5, "num_inference_steps": 2}, timeout_s=240)
    assert result.ok, f"{result.error_type}: {result.error}\n{log_path.read_text()[-3000:]}"
    response = json.loads(result.payload)
    assert response["seed"] == 5
    image = Image.open(io.BytesIO(base64.b64decode(response["image"])))
    assert image.format == "PNG"
    assert image.size == (response["width"], response["height"])


def test_image_fits_the_size_budget(image_python: Path) -> None:
    venv = image_python.parent.parent
    pip_dir = next((venv / "lib").glob("python3.*/site-packages/pip"))
    installed = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    pip_bytes = sum(p.stat().st_size for p in pip_dir.rglob("*") if p.is_file())
    estimate = installed - pip_bytes + BASE_IMAGE_ESTIMATE_BYTES  # the Dockerfile removes pip
    print(
        f"image venv {installed / 1e9:.3f} GB (pip {pip_bytes / 1e6:.0f} MB); image ~{estimate / 1e9:.3f} GB"
    )
    assert estimate <= IMAGE_BUDGET_BYTES
