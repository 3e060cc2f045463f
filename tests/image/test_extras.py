"""pyproject's extras follow the package layout: each subpackage's third-party imports are declared in the
extras its install needs, and the operator commands run on an install without the runtime extra."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from sd_lambda.ops.container.requirements import ProjectDependencies

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "sd_lambda"
DEPENDENCIES = ProjectDependencies.from_pyproject(ROOT / "pyproject.toml")
# Which installs each part of the package must work on.
TOP_MODULES = ("__init__.py", "cli.py", "layout.py", "settings.py")
AREAS: dict[str, tuple[str, ...]] = {
    "serving": ("runtime",),
    "engine": ("runtime",),
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


def distributions_of(import_name: str) -> set[str]:
    providers = importlib.metadata.packages_distributions().get(import_name, [])
    assert providers, f"no installed distribution provides {import_name!r}: declare it in pyproject"
    return {canonicalize_name(name) for name in providers}


def area_files() -> list[tuple[str, Path, tuple[str, ...]]]:
    files = [("top", PACKAGE / name, ()) for name in TOP_MODULES]
    for area, extras in AREAS.items():
        files += [(area, path, extras) for path in sorted((PACKAGE / area).rglob("*.py"))]
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
    allowed = declared(extras)
    undeclared = {
        name: sorted(distributions_of(name))
        for name in third_party_imports(path)
        if not distributions_of(name) & allowed
    }
    where = f"base + [{', '.join(extras)}]" if extras else "the base dependencies"
    assert undeclared == {}, f"{path.relative_to(ROOT)} ({area}) imports what {where} does not declare"


def test_the_check_sees_an_undeclared_import(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("import os\n\ndef upload():\n    import boto3.session\n    from torch import nn\n")
    assert third_party_imports(module) == {"boto3", "torch"}
    assert not distributions_of("torch") & declared(("ops",))
    assert distributions_of("torch") <= declared(("runtime",))


# Distributions only the runtime extra brings: an operator install (base + ops) has none of them.
RUNTIME_ONLY = sorted(declared(("runtime",)) - declared(("ops",)))
OPERATOR_SCRIPT = """\
import importlib.metadata, json, sys

blocked = {{
    name
    for name, providers in importlib.metadata.packages_distributions().items()
    if {{p.lower().replace("_", "-") for p in providers}} & set({runtime_only!r})
}}


# Every finder is wrapped: a runtime-only module is not there (find_spec None, import fails).
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

subparsers = next(a for a in build_parser()._actions if a.dest == "command")
results = {{}}
for argv in [[name, "--help"] for name in subparsers.choices] + {extra_argv!r}:
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    results[" ".join(argv)] = code
print(json.dumps({{"blocked": sorted(blocked), "exit": results}}))
"""


def run_without_runtime(extra_argv: list[list[str]]) -> tuple[dict, str]:
    script = OPERATOR_SCRIPT.format(runtime_only=RUNTIME_ONLY, extra_argv=extra_argv)
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=300, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def test_operator_commands_run_without_the_runtime_extra() -> None:
    report, stderr = run_without_runtime(
        [["requirements", "--check"], ["seed", "--model", "owner/model", "--bf16-copy"]]
    )
    assert {"torch", "diffusers", "transformers", "PIL", "awslambdaric"} <= set(report["blocked"])
    exits = report["exit"]
    helps = {argv: code for argv, code in exits.items() if argv.endswith("--help")}
    assert {"seed --help", "rollback --help", "deploy --help", "generate --help"} <= set(helps)
    assert helps == dict.fromkeys(helps, 0)
    # A real operator command: reads pyproject and checks the image's locks, no torch involved.
    assert exits["requirements --check"] == 0
    # The one seeding option that needs torch says which extra to install before downloading anything.
    assert exits["seed --model owner/model --bf16-copy"] == 1
    assert "install the runtime extra (pip install -e '.[runtime]'" in stderr
    assert "Traceback" not in stderr


def test_the_handlers_import_walk_reaches_only_runtime_modules(tmp_path: Path) -> None:
    helper = Path(__file__).with_name("runtime_imports.py")
    completed = subprocess.run(
        [sys.executable, str(helper), "sd_lambda.serving.handler"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    modules = json.loads(completed.stdout)["modules"]
    assert {"sd_lambda.serving.handler", "sd_lambda.engine.torch_engine"} <= set(modules)
    # Only serving/, engine/ and the two top-level modules they share: no ops/, seeding/, devtools/, cli.
    areas = {name.split(".")[1] for name in modules if name != "sd_lambda"}
    assert areas == {"serving", "engine", "layout", "settings"}
