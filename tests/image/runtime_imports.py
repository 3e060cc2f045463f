"""Run by the image venv's python: which imports of the Lambda's code cannot be satisfied there?

Walks the root modules given (``sd_lambda.serving.handler`` and the engine modules it imports by name)
and every ``sd_lambda`` module they import, and prints, as JSON, the ``sd_lambda`` modules reached and
each external top-level module found with whether this interpreter can import it. Two walks: one follows
every import (at module level or inside functions, so lazy imports on rare paths count too), the other
only the imports that run when a module is imported (``eager_``: module and class bodies, not functions),
which is what importing the roots needs. The packages above each module count as imported. Standard
library only.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path


def imported_names(path: str, package: str, eager_only: bool = False) -> set[str]:
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), path)
    names: set[str] = set()
    nodes: list[ast.AST] = [tree]
    while nodes:
        node = nodes.pop()
        if eager_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue  # a function body runs when called, not when its module is imported
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        nodes.extend(ast.iter_child_nodes(node))
    return names


def source_of(name: str, package_dir: Path) -> tuple[Path, bool] | None:
    """(file, is_package) for an ``sd_lambda`` module, found without importing anything."""
    relative = Path(*name.split(".")[1:])
    if (package_dir / relative / "__init__.py").is_file():  # for "sd_lambda" itself: package_dir
        return package_dir / relative / "__init__.py", True
    if relative.parts and (package_dir / relative).with_suffix(".py").is_file():
        return (package_dir / relative).with_suffix(".py"), False
    return None  # "from package import name" where name is not a module


def walk(roots: list[str], package_dir: Path, eager_only: bool) -> tuple[set[str], set[str]]:
    """(sd_lambda modules reached, external top-level modules they import)."""
    seen: set[str] = set()
    external: set[str] = set()
    frontier = list(roots)
    while frontier:
        name = frontier.pop()
        found = source_of(name, package_dir)
        if name in seen or found is None:
            continue
        seen.add(name)
        # Importing a module runs every package above it first.
        frontier.extend(name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1))
        path, is_package = found
        package = name if is_package else name.rpartition(".")[0]
        for imported in imported_names(str(path), package, eager_only):
            top = imported.split(".")[0]
            if top == "sd_lambda":
                frontier.append(imported)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                external.add(top)
    return seen, external


def main(roots: list[str]) -> None:
    spec = importlib.util.find_spec("sd_lambda")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("sd_lambda is not installed in this interpreter")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    modules, external = walk(roots, package_dir, eager_only=False)
    eager_modules, eager_external = walk(roots, package_dir, eager_only=True)
    report = {
        "package_dir": str(package_dir),
        "modules": sorted(modules),
        "external": {top: importlib.util.find_spec(top) is not None for top in sorted(external)},
        "eager_modules": sorted(eager_modules),
        "eager_external": sorted(eager_external),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:] or ["sd_lambda.serving.handler"])
