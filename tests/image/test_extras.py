"""pyproject's extras follow the package layout: each subpackage's third-party imports are declared in the
extras its install needs, and the operator commands run on an install without the runtime extra."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sd_lambda.engine.backend import ENGINE_CLASSES
from sd_lambda.ops.container.requirements import VARIANTS, ProjectDependencies

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "sd_lambda"
DEPENDENCIES = ProjectDependencies.from_pyproject(ROOT / "pyproject.toml")
# Which installs each part of the package must work on.
TOP_MODULES = ("__init__.py", "cli.py", "layout.py", "settings.py")
# serving/ and engine/ run in either image; which of their modules each image imports is held to its own
# extra by test_each_images_import_path_is_declared_in_its_extra.
AREAS: dict[str, tuple[str, ...]] = {
    "serving": ("runtime", "openvino"),
    "engine": ("runtime", "openvino"),
    "ops": ("ops",),
    "seeding": ("ops",),
    "devtools": ("dev",),
}


def declared(extras: tuple[str, ...]) -> set[str]:
    requirements = [*DEPENDENCIES.base, *(r for extra in extras for r in DEPENDENCIES.extra(extra))]
    return {canonicalize_name(requirement.name) for requirement in requirements}


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path``, lazy ones included; stdlib excluded."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names} - {"__future__", "sd_lambda"}


# Modules that run in a venv of their own, installed with its own extra: the seed driver runs the
# OpenVINO exporter in the export venv (`make install-export`), whose optimum-intel the dev venv lacks.
EXPORT_PYTHON = ROOT / ".venv-export" / "bin" / "python"
OWN_VENV: dict[str, tuple[tuple[str, ...], Path]] = {
    "seeding/openvino_export.py": (("export",), EXPORT_PYTHON),
    "devtools/optimum_runtime.py": (("export",), EXPORT_PYTHON),
}


@functools.cache
def _installed_distributions(python: Path | None) -> dict[str, list[str]]:
    """Import name -> the distributions providing it, in this interpreter or in ``python``'s."""
    if python is None:
        return dict(importlib.metadata.packages_distributions())
    script = "import importlib.metadata as m, json; print(json.dumps(m.packages_distributions()))"
    completed = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


@functools.cache
def _requires(python: Path, distribution: str) -> tuple[str, ...]:
    """``distribution``'s requirements as installed in ``python``'s venv (extras' ones included)."""
    script = "import importlib.metadata as m, json, sys; print(json.dumps(m.requires(sys.argv[1]) or []))"
    completed = subprocess.run(
        [str(python), "-c", script, distribution], capture_output=True, text=True, check=True
    )
    return tuple(json.loads(completed.stdout))


def declared_in_own_venv(extras: tuple[str, ...], python: Path) -> set[str]:
    """``declared(extras)`` plus what its requirements' own extras bring (``optimum-intel[diffusers]``
    declares diffusers), read from the venv those extras are installed in."""
    names = declared(extras)
    for requirement in (r for extra in extras for r in DEPENDENCIES.extra(extra) if r.extras):
        for raw in _requires(python, requirement.name):
            pulled = Requirement(raw)
            if pulled.marker and any(pulled.marker.evaluate({"extra": e}) for e in requirement.extras):
                names.add(canonicalize_name(pulled.name))
    return names


def distributions_of(import_name: str, python: Path | None = None) -> set[str]:
    providers = _installed_distributions(python).get(import_name, [])
    assert providers, f"no installed distribution provides {import_name!r}: declare it in pyproject"
    return {canonicalize_name(name) for name in providers}


def area_files() -> list[tuple[str, Path, tuple[str, ...]]]:
    files = [("top", PACKAGE / name, ()) for name in TOP_MODULES]
    for area, extras in AREAS.items():
        for path in sorted((PACKAGE / area).rglob("*.py")):
            own = OWN_VENV.get(path.relative_to(PACKAGE).as_posix())
            files.append((area, path, own[0] if own else extras))
    return files


def test_every_subpackage_has_an_install() -> None:
    subpackages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert subpackages == set(AREAS)
    modules = {path.name for path in PACKAGE.glob("*.py")}
    assert modules == set(TOP_MODULES)


@pytest.mark.parametrize(
    ("area", "path", "extras"),
    area_files(),
    ids=lambda value: str(value.relative_to(PACKAGE)) if isinstance(value, Path) else None,
)
def test_third_party_imports_are_declared_in_the_areas_extras(
    area: str, path: Path, extras: tuple[str, ...]
) -> None:
    own = OWN_VENV.get(path.relative_to(PACKAGE).as_posix())
    python = own[1] if own else None
    if python is not None and not python.is_file():
        pytest.fail(f"{path.name} runs in {python}, which is missing: run make install-export")
    allowed = declared_in_own_venv(extras, python) if python is not None else declared(extras)
    undeclared = {
        name: sorted(distributions_of(name, python))
        for name in third_party_imports(path)
        if not distributions_of(name, python) & allowed
    }
    where = f"base + [{', '.join(extras)}]" if extras else "the base dependencies"
    assert undeclared == {}, f"{path.relative_to(ROOT)} ({area}) imports what {where} does not declare"


def test_the_check_sees_an_undeclared_import(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("import os\n\ndef upload():\n    import boto3.session\n    from torch import nn\n")
    assert third_party_imports(module) == {"boto3", "torch"}
    assert not distributions_of("torch") & declared(("ops",))
    assert distributions_of("torch") <= declared(("runtime",))


# An operator install (base + ops) has none of the distributions only the runtime extra brings, and none of
# the ones only the dev extra declares (the tools the tests and devtools use).
RUNTIME_ONLY = sorted(declared(("runtime", "openvino")) - declared(("ops",)))
DEV_ONLY = sorted(declared(("dev",)) - declared(("runtime", "openvino", "ops")))
OPERATOR_SCRIPT = """\
import argparse, importlib.metadata, json, sys

blocked = {{
    name
    for name, providers in importlib.metadata.packages_distributions().items()
    if {{p.lower().replace("_", "-") for p in providers}} & set({not_installed!r})
}}


# Every finder is wrapped: a blocked module is not there (find_spec None, import fails).
class NotInstalled:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in blocked:
            return None
        return self.finder.find_spec(fullname, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [NotInstalled(finder) for finder in sys.meta_path]
from sd_lambda.cli import build_parser, main


def commands(parser, prefix):
    # Every command and action, nested ones included (deploy plan, tfcheck validate, ...).
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield [*prefix, name]
                yield from commands(child, [*prefix, name])


results = {{}}
for argv in [["--help"]] + [[*path, "--help"] for path in commands(build_parser(), [])] + {extra_argv!r}:
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    results[" ".join(argv)] = code
print(json.dumps({{"blocked": sorted(blocked), "exit": results}}))
"""


def run_on_an_operator_install(extra_argv: list[list[str]]) -> tuple[dict, str]:
    script = OPERATOR_SCRIPT.format(not_installed=RUNTIME_ONLY + DEV_ONLY, extra_argv=extra_argv)
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=300, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def test_the_dev_only_set_is_the_tools() -> None:
    assert {"tf", "grpcio", "msgpack", "protobuf", "moto", "pytest"} <= set(DEV_ONLY)
    assert canonicalize_name("sd-lambda") not in DEV_ONLY
    assert not set(DEV_ONLY) & declared(("ops",))


def test_operator_commands_run_without_the_runtime_and_dev_extras() -> None:
    report, stderr = run_on_an_operator_install(
        [
            ["requirements", "--check"],
            ["seed", "--model", "owner/model", "--bf16-copy"],
            ["tfcheck", "fmt", "infra"],
            ["make-test-model", "--dry"],
        ]
    )
    blocked = set(report["blocked"])
    assert {"torch", "diffusers", "transformers", "PIL", "awslambdaric"} <= blocked
    assert {"tf", "grpc", "msgpack", "google", "moto", "pytest"} <= blocked
    exits = report["exit"]
    helps = {argv: code for argv, code in exits.items() if argv.endswith("--help")}
    assert {"--help", "seed --help", "rollback --help", "deploy --help", "deploy preflight --help"} <= set(
        helps
    )
    assert {"generate --help", "tfcheck --help", "tfcheck validate --help", "bench --help"} <= set(helps)
    assert helps == dict.fromkeys(helps, 0)
    # A real operator command: reads pyproject and checks the image's locks, no torch involved.
    assert exits["requirements --check"] == 0
    # The one seeding option that needs torch says which install brings it before downloading anything.
    assert exits["seed --model owner/model --bf16-copy"] == 1
    assert "needs torch: make install" in stderr
    # A dev command says in one line which install it needs.
    assert exits["tfcheck fmt infra"] == exits["make-test-model --dry"] == 1
    assert "sd-lambda tfcheck: error: needs the dev install: make install (tf is not installed)" in stderr
    assert "sd-lambda make-test-model: error: needs the dev install: make install" in stderr
    assert "Traceback" not in stderr


def import_walk(roots: list[str], cwd: Path) -> dict:
    helper = Path(__file__).with_name("runtime_imports.py")
    completed = subprocess.run(
        [sys.executable, str(helper), *roots],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
        timeout=120,
    )
    return json.loads(completed.stdout)


# The handler, and the engines it imports by name (sd_lambda.engine.backend).
HANDLER_ROOTS = ["sd_lambda.serving.handler", *(module for module, _ in ENGINE_CLASSES.values())]


@pytest.mark.parametrize("engine", sorted(ENGINE_CLASSES))
def test_each_images_import_path_is_declared_in_its_extra(engine: str, tmp_path: Path) -> None:
    """What importing the handler and an engine runs is declared in that engine's image extra (the
    OpenVINO image: base + [openvino], no torch); lazy imports anywhere on the walk in one of the two."""
    report = import_walk(["sd_lambda.serving.handler", ENGINE_CLASSES[engine][0]], tmp_path)
    extra = VARIANTS[engine].extra
    undeclared = {
        name: sorted(distributions_of(name))
        for name in report["eager_external"]
        if not distributions_of(name) & declared((extra,))
    }
    assert undeclared == {}, f"importing the handler with the {engine} engine needs what [{extra}] lacks"
    lazy = {name for name in report["external"] if not distributions_of(name) & declared(AREAS["engine"])}
    assert lazy == set()


def test_the_handlers_import_walk_reaches_only_runtime_modules(tmp_path: Path) -> None:
    modules = import_walk(HANDLER_ROOTS, tmp_path)["modules"]
    assert {"sd_lambda.serving.handler", "sd_lambda.engine.torch_engine"} <= set(modules)
    assert "sd_lambda.engine.openvino_engine" in modules
    # Only serving/, engine/ and the two top-level modules they share: no ops/, seeding/, devtools/, cli.
    areas = {name.split(".")[1] for name in modules if name != "sd_lambda"}
    assert areas == {"serving", "engine", "layout", "settings"}
