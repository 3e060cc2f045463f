"""The images' Python layer, proven without Docker, for each variant (image/Dockerfile's ENGINE).

A fresh venv per variant gets exactly what image/Dockerfile installs for it: the variant's locks with
``--require-hashes --no-deps`` (so nothing unpinned and none of the ops/dev extras; the torch image's two,
the OpenVINO image's one), then the package itself with ``--no-deps``, built from the files the
Dockerfile's COPY lines lay out (only its runtime part: no ops/, seeding/, devtools/ or cli.py). From
that venv, ``python -m awslambdaric sd_lambda.serving.handler.handler`` (the image's ENTRYPOINT + CMD)
serves a real invocation from the local Lambda Runtime API: the torch image the tiny model, the OpenVINO
image the tiny model's OpenVINO export, with a watch on every import attempt proving that process never
reaches for torch, diffusers, transformers or safetensors. The OpenVINO venv is installed from PyPI like
the image, not borrowed from the dev venv with the torch stack hidden: only a venv holding exactly the
lock proves the lock is complete and the torch stack is absent. Each venv's installed size, plus the
base image, is checked against its image budget.
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
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release
from PIL import Image

from image.dockerfile import lay_out_package_source
from sd_lambda.devtools.local.launcher import LocalLambda
from sd_lambda.engine.backend import ENGINE_CLASSES
from sd_lambda.layout import ENGINES
from sd_lambda.ops.container.requirements import TORCH_STACK, parse, unsupported_via

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "image" / "requirements.txt"
TORCH_LOCK = ROOT / "image" / "requirements-torch.txt"
OPENVINO_LOCK = ROOT / "image" / "requirements-openvino.txt"
# Each variant's locks, in the order the Dockerfile installs them.
LOCKS = {"torch": (TORCH_LOCK, LOCK), "openvino": (OPENVINO_LOCK,)}
# python:3.11-slim-bookworm, uncompressed (linux/amd64): about 125 MB on Docker Hub's listing; counted
# generously here because no Docker engine is available to measure it.
BASE_IMAGE_ESTIMATE_BYTES = 160_000_000
# The torch image's target, and the OpenVINO image's: the point of the variant is to leave the torch
# stack's gigabyte out.
IMAGE_BUDGET_BYTES = {"torch": 1_500_000_000, "openvino": 600_000_000}
HANDLER = "sd_lambda.serving.handler"
# The libraries only one engine's image installs (top-level import names).
ENGINE_LIBRARIES = {"torch": TORCH_STACK, "openvino": ("openvino", "openvino_genai", "openvino_tokenizers")}
EXPORT_PYTHON = ROOT / ".venv-export" / "bin" / "python"
IMPORT_WATCH = Path(__file__).with_name("import_watch")


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


def _build_image_venv(tmp_path_factory: pytest.TempPathFactory, engine: str) -> Path:
    """``engine``'s image venv: its locks + the package, all --no-deps, as in the Dockerfile."""
    venv = tmp_path_factory.mktemp(f"image-venv-{engine}") / "venv"
    env = _isolated_env()
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "--quiet", "--no-deps"]
    if engine == "openvino":  # as the Dockerfile: the seeded setuptools is not in this lock
        _run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "setuptools"], env=env)
    # As the Dockerfile: every file checked against the locks' hashes (for torch: torch in its own step).
    for lock in LOCKS[engine]:
        _run([*pip, "--require-hashes", "--only-binary=:all:", "-r", str(lock)], env=env)
    wheel_dir = tmp_path_factory.mktemp(f"image-wheel-{engine}")
    # The package source exactly as the Dockerfile's COPY lines lay it out in /tmp/sd-lambda.
    source = tmp_path_factory.mktemp(f"image-package-source-{engine}")
    lay_out_package_source(source)
    _run(
        [str(python), "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheel_dir), str(source)],
        env=env,
    )
    _run([*pip, *map(str, wheel_dir.glob("sd_lambda-*.whl"))], env=env)
    (venv / "bin" / "sd-lambda").unlink()  # as the Dockerfile: its cli.py is not in the image
    _run([str(python), "-m", "pip", "check"], env=env)
    return python


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The torch image venv's python."""
    return _build_image_venv(tmp_path_factory, "torch")


@pytest.fixture(scope="module")
def openvino_image_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The OpenVINO image venv's python."""
    return _build_image_venv(tmp_path_factory, "openvino")


@pytest.fixture(scope="module", params=ENGINES)
def variant(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(engine, that image venv's python) for the checks every variant must pass."""
    fixture = {"torch": "image_python", "openvino": "openvino_image_python"}[request.param]
    return request.param, request.getfixturevalue(fixture)


def _import_walk(python: Path, roots: list[str], cwd: Path) -> dict:
    helper = Path(__file__).with_name("runtime_imports.py")
    return json.loads(_run([str(python), str(helper), *roots], cwd=cwd, env=_isolated_env()).stdout)


def _engine_module(engine: str) -> str:
    return ENGINE_CLASSES[engine][0]


def _locked(engine: str) -> list:
    return [entry for lock in LOCKS[engine] for entry in parse(lock.read_text())]


def test_venv_holds_exactly_the_lock_and_the_package(variant: tuple[str, Path]) -> None:
    engine, python = variant
    listed = _run([str(python), "-m", "pip", "list", "--format=json"], env=_isolated_env()).stdout
    installed = {item["name"].lower().replace("_", "-"): item["version"] for item in json.loads(listed)}
    expected = {entry.name: entry.version for entry in _locked(engine)}
    assert installed.pop("sd-lambda") == "0.1.0"
    installed.pop("pip")
    assert installed == expected
    assert not {"moto", "selenium"} & set(installed)  # test tools never reach the image (boto3 does: jobs)
    assert "pytest" not in installed
    if engine == "openvino":
        assert not set(installed) & set(TORCH_STACK)
        assert {"openvino", "openvino-genai", "openvino-tokenizers"} <= set(installed)


def test_lock_provenance_matches_the_installed_metadata(variant: tuple[str, Path]) -> None:
    """Each ``# via`` claim is backed by the Requires-Dist of the version actually installed."""
    script = (
        "import json, importlib.metadata as m, sys\n"
        # pip's own copy of packaging: the OpenVINO image installs none (pip is in the venv until the
        # Dockerfile removes it at the end of its build stage).
        "from pip._vendor.packaging.markers import default_environment\n"
        "from pip._vendor.packaging.utils import canonicalize_name as c\n"
        "print(json.dumps({'env': default_environment(), 'requires': "
        "{c(d.metadata['Name']): d.requires or [] for d in m.distributions()}}))\n"
    )
    engine, python = variant
    report = json.loads(_run([str(python), "-c", script], env=_isolated_env()).stdout)
    assert unsupported_via(_locked(engine), report["requires"], report["env"]) == []


def test_the_image_holds_no_operator_or_developer_code(variant: tuple[str, Path], tmp_path: Path) -> None:
    engine, python = variant
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
    report = json.loads(_run([str(python), "-c", script], cwd=tmp_path, env=env).stdout)
    assert report["found"] == []
    areas = {name.split(".")[1] for name in report["modules"]}
    assert areas == {"serving", "engine", "layout", "settings"}
    assert not (python.parent / "sd-lambda").exists()
    # Both images hold the same package: in each, only the other engine's modules fail to import, each
    # for want of that engine's libraries, and the handler, the backend and this image's engine import.
    (other,) = [name for name in ENGINES if name != engine]
    absent = {f"No module named '{name}'" for name in ENGINE_LIBRARIES[other]}
    assert all(any(reason in error for reason in absent) for error in report["failed"].values()), report
    assert _engine_module(other) in report["failed"]
    assert not {HANDLER, _engine_module(engine), "sd_lambda.engine.backend"} & set(report["failed"])


def test_runtime_code_imports_only_what_the_image_installs(variant: tuple[str, Path], tmp_path: Path) -> None:
    engine, python = variant
    # The handler, and the engine it imports by name for this image's releases.
    roots = [HANDLER, _engine_module(engine)]
    report = _import_walk(python, roots, tmp_path)
    assert Path(report["package_dir"]).is_relative_to(python.parent.parent)  # not the repo's src/
    assert {HANDLER, "sd_lambda.serving.service", "sd_lambda.engine.backend", roots[1]} <= set(
        report["modules"]
    )
    # The walk in the image reaches every module the same walk reaches in the repository (where ops/,
    # seeding/ and devtools/ exist): the handler's code needs nothing the image left out.
    in_repository = _import_walk(Path(sys.executable), roots, tmp_path)
    assert report["modules"] == in_repository["modules"]
    locks = ", ".join(lock.name for lock in LOCKS[engine])
    if engine == "torch":
        missing = [name for name, importable in report["external"].items() if not importable]
        assert missing == [], f"the Lambda's code imports {missing}, which {locks} does not install"
        assert {"torch", "diffusers", "aws_lambda_powertools"} <= set(report["external"])
        return
    # What importing the handler and the OpenVINO engine runs is all installed; a lazy import of a
    # torch-engine library inside a shared module (the accelerations' diffusers version check) may stay
    # unreachable here, which the served invocation below proves for the OpenVINO path.
    missing = [name for name in report["eager_external"] if not report["external"][name]]
    assert missing == [], f"importing the OpenVINO path needs {missing}, which {locks} does not install"
    assert {"openvino_genai", "aws_lambda_powertools"} <= set(report["eager_external"])
    assert not set(report["eager_external"]) & set(TORCH_STACK)


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
    image = Image.open(io.BytesIO(base64.b64decode(response["images"][0]["image"])))
    assert image.format == "PNG"
    assert image.size == (response["width"], response["height"])


@pytest.fixture(scope="module")
def openvino_model_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A MODEL_ROOT whose current release is the tiny model exported to OpenVINO IR by the export
    module, in the export venv as the seed driver runs it."""
    if not EXPORT_PYTHON.is_file():
        pytest.fail(f"{EXPORT_PYTHON} is missing: run make install-export (the OpenVINO export venv)")
    export = tmp_path_factory.mktemp("tiny-openvino") / "model"
    _run([str(EXPORT_PYTHON), "-m", "sd_lambda.seeding.openvino_export", str(tiny_model_dir), str(export)])
    root = tmp_path_factory.mktemp("openvino-models")
    seed_release(root, TEST_MODEL_NAME, TEST_REVISION, export)
    return root


def test_awslambdaric_serves_an_openvino_release_without_the_torch_stack(
    openvino_image_python: Path, openvino_model_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OpenVINO image's CMD serves the OpenVINO release, and its process never asks for torch,
    diffusers, transformers or safetensors (import_watch records every attempt with its importer)."""
    monkeypatch.chdir(tmp_path)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        monkeypatch.delenv(name, raising=False)
    attempts = tmp_path / "torch-stack-imports.jsonl"
    env = {
        "MODEL_ROOT": str(openvino_model_root),
        "MODEL_NAME": TEST_MODEL_NAME,
        "SD_OPENVINO_CACHE_DIR": str(tmp_path / "openvino-cache"),
        "PYTHONNOUSERSITE": "1",
        "PYTHONSAFEPATH": "1",  # as the image sets it
        "HF_HUB_OFFLINE": "1",
        # The watch only: site imports its sitecustomize, nothing else is importable from there.
        "PYTHONPATH": str(IMPORT_WATCH),
        "SD_LAMBDA_TEST_IMPORT_LOG": str(attempts),
    }
    log_path = tmp_path / "lambda.log"
    with LocalLambda(env, python=str(openvino_image_python), timeout_s=240, log_path=log_path) as function:
        assert function.command == [str(openvino_image_python), "-m", "awslambdaric", f"{HANDLER}.handler"]
        result = function.invoke({"prompt": "a red cube", "seed": 5, "num_inference_steps": 2}, timeout_s=240)
    assert result.ok, f"{result.error_type}: {result.error}\n{log_path.read_text()[-3000:]}"
    response = json.loads(result.payload)
    assert "error" not in response, f"{response}\n{log_path.read_text()[-3000:]}"
    assert response["seed"] == 5
    image = Image.open(io.BytesIO(base64.b64decode(response["images"][0]["image"])))
    assert image.format == "PNG"
    assert image.size == (response["width"], response["height"])
    imported = [json.loads(line) for line in attempts.read_text().splitlines()] if attempts.exists() else []
    assert imported == [], "the OpenVINO image's process reached for the torch stack:\n" + "\n".join(
        f"{attempt['module']} from {' <- '.join(reversed(attempt['stack']))}" for attempt in imported
    )


def test_the_import_watch_sees_an_attempt(openvino_image_python: Path, tmp_path: Path) -> None:
    """The watch behind the test above records an import the process swallows."""
    attempts = tmp_path / "attempts.jsonl"
    env = {**_isolated_env(), "PYTHONPATH": str(IMPORT_WATCH), "SD_LAMBDA_TEST_IMPORT_LOG": str(attempts)}
    script = "try:\n    import diffusers.pipelines\nexcept ImportError:\n    pass\n"
    _run([str(openvino_image_python), "-c", script], cwd=tmp_path, env=env)
    (attempt,) = [json.loads(line) for line in attempts.read_text().splitlines()]
    assert attempt["module"] == "diffusers"
    assert "<string>:2" in attempt["stack"][-1]


def test_image_fits_the_size_budget(variant: tuple[str, Path]) -> None:
    engine, python = variant
    venv = python.parent.parent
    pip_dir = next((venv / "lib").glob("python3.*/site-packages/pip"))
    installed = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    pip_bytes = sum(p.stat().st_size for p in pip_dir.rglob("*") if p.is_file())
    estimate = installed - pip_bytes + BASE_IMAGE_ESTIMATE_BYTES  # the Dockerfile removes pip
    print(
        f"{engine} image venv {installed / 1e9:.3f} GB (pip {pip_bytes / 1e6:.0f} MB); "
        f"image ~{estimate / 1e9:.3f} GB"
    )
    assert estimate <= IMAGE_BUDGET_BYTES[engine]
