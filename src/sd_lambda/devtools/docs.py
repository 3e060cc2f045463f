"""Documentation tables generated from the code that enforces them: request fields, environment, make targets.

``python -m sd_lambda.devtools.docs`` rewrites the blocks between ``<!-- BEGIN generated: NAME -->`` and
``<!-- END generated: NAME -->`` wherever they stand in README.md and docs/*.md (each block in exactly one
page); ``--check`` only reports drift (a test runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic.fields import FieldInfo

from sd_lambda.serving.request import (
    FromModel,
    GenerationRequest,
    bounds,
    choices,
    default_source,
    multiple_of,
    number,
    setting_max,
    type_name,
)
from sd_lambda.settings import Settings, documented_variables

REPO = Path(__file__).resolve().parents[3]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAKEFILE = REPO / "Makefile"
# `target: prerequisites ## description` — the same lines `make help` prints.
MAKE_TARGET = re.compile(r"^([A-Za-z0-9_-]+):[^=]*?## (.+)$", re.MULTILINE)


def request_table(settings: Settings | None = None) -> str:
    """One row per ``GenerationRequest`` field: type, what is allowed, default and description."""
    settings = settings or Settings()
    rows = ["| field | type | allowed | default | description |", "| --- | --- | --- | --- | --- |"]
    for name, field in GenerationRequest.model_fields.items():
        rows.append(
            f"| `{name}` | {type_name(field)} | {_allowed(field, settings)} | {_default(field)} "
            f"| {field.description or ''} |"
        )
    return "\n".join(rows)


def _allowed(field: FieldInfo, settings: Settings) -> str:
    options = choices(field)
    if options:
        return ", ".join(f"`{option}`" for option in options)
    low, high = bounds(field, settings)
    text = f"{number(low)} to {number(high)}" if low is not None else f"up to {number(high)}"
    if type_name(field) == "string":
        text += " characters"
    step = multiple_of(field)
    if step:
        text += f", multiple of {step}"
    bound = setting_max(field)
    if bound is not None:
        text += f" (max: `{bound.env}`)"
    return text


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    source = default_source(field)
    if isinstance(source, FromModel):
        return f"{source.doc} (`{source.attribute}`)"
    if source is not None:
        return source.doc
    return f"`{field.default}`"


def configuration_table() -> str:
    rows = ["| variable | default | description |", "| --- | --- | --- |"]
    rows += [f"| `{env}` | `{default}` | {text} |" for env, default, text in documented_variables()]
    return "\n".join(rows)


def make_targets_table(makefile: Path = MAKEFILE) -> str:
    """One row per documented Makefile target, in Makefile order (the source `make help` reads)."""
    rows = ["| target | what it does |", "| --- | --- |"]
    for target, description in MAKE_TARGET.findall(makefile.read_text()):
        escaped = description.strip().replace("|", r"\|")
        rows.append(f"| `make {target}` | {escaped} |")
    return "\n".join(rows)


GENERATORS: dict[str, Callable[[], str]] = {
    "request-fields": request_table,
    "configuration": configuration_table,
    "make-targets": make_targets_table,
}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- BEGIN generated: {re.escape(name)} -->\n).*?(<!-- END generated: {re.escape(name)} -->)",
        re.DOTALL,
    )


def blocks_in(text: str) -> list[str]:
    """The names of the generated blocks ``text`` holds."""
    return [name for name in GENERATORS if _block(name).search(text)]


def render(text: str) -> str:
    """``text`` with every generated block it holds replaced by its current content."""
    for name in blocks_in(text):
        text = _block(name).sub(lambda match, g=GENERATORS[name]: f"{match[1]}{g()}\n{match[2]}", text)
    return text


def documents() -> list[Path]:
    """The pages that may hold generated blocks: the README and every page under docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def placement_problems(pages: list[Path]) -> list[str]:
    """Each generated block must stand in exactly one page, so no table is kept in two places."""
    found: dict[str, list[Path]] = {name: [] for name in GENERATORS}
    for page in pages:
        for name in blocks_in(page.read_text()):
            found[name].append(page)
    return [
        f"generated block {name!r} is in {len(places)} pages ({', '.join(map(str, places)) or 'none'}); "
        "it belongs in exactly one"
        for name, places in found.items()
        if len(places) != 1
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sd_lambda.devtools.docs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    parser.add_argument("pages", nargs="*", type=Path, help="pages to render (default: README.md, docs/*.md)")
    args = parser.parse_args(argv)
    pages = args.pages or documents()
    problems = [] if args.pages else placement_problems(pages)
    for page in pages:
        current = page.read_text()
        updated = render(current)
        if updated == current:
            continue
        if args.check:
            problems.append(f"{page} is out of date: run python -m sd_lambda.devtools.docs")
        else:
            page.write_text(updated)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
