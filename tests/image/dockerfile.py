"""image/Dockerfile read without a Docker engine: its stages, and what its COPY lines put in the build
stage, so a test can lay out exactly the files the image installs the package from."""

from __future__ import annotations

import fnmatch
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "image" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# Where the build stage puts the package's source before `pip install --no-deps` reads it.
PACKAGE_SOURCE = PurePosixPath("/tmp/sd-lambda")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [value for kw, value in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += (
            " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        )
        if not stripped.endswith("\\"):
            logical.append(current)
            current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.match(r"^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", value, re.IGNORECASE)
            assert match, line
            stages.append(Stage(match[1], match[2]))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede FROM: {line}"
            name, _, default = value.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, value))
    return global_args, stages


def package_copies(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context into PACKAGE_SOURCE, in order."""
    copies = []
    for value in stage.all("COPY"):
        if value.startswith("--"):
            continue
        *sources, destination = value.split()
        target = PurePosixPath(destination)
        if target == PACKAGE_SOURCE or PACKAGE_SOURCE in target.parents:
            copies.append((sources, destination))
    return copies


def ignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def dockerignore_admits(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or one of its parent folders) decides."""
    admitted = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            admitted = negated
    return admitted


def lay_out_package_source(target: Path) -> list[str]:
    """Do what the build stage's COPY lines do, with ``target`` standing for PACKAGE_SOURCE; returns the
    files laid out (relative to ``target``). As Docker does: a file copied to a destination ending in ``/``
    lands inside it, a folder's contents are copied into the destination, and only what .dockerignore
    lets into the build context is there to copy."""
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    patterns = ignore_patterns()
    written = []
    for sources, destination in package_copies(stages[0]):
        base = target / PurePosixPath(destination).relative_to(PACKAGE_SOURCE)
        into_folder = destination.endswith("/")  # Docker: a file source lands inside such a destination
        for source in sources:
            origin = ROOT / source
            files = [origin] if origin.is_file() else sorted(p for p in origin.rglob("*") if p.is_file())
            for file in files:
                if not dockerignore_admits(file.relative_to(ROOT).as_posix(), patterns):
                    continue
                if origin.is_dir():
                    placed = base / file.relative_to(origin)
                else:
                    placed = base / file.name if into_folder else base
                placed.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, placed)
                written.append(placed.relative_to(target).as_posix())
    return sorted(written)
