"""Every generated table of the documentation, from the code and Terraform that define what it lists.

``python -m sd_lambda.devtools.docs`` (``make docs``) rewrites the blocks between
``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->`` in README.md, docs/*.md and the
READMEs under infra/; ``--check`` only reports drift (a test runs it). The blocks:

- ``make-targets``: the Makefile's ``## `` comments, the lines ``make help`` prints;
- ``request-fields`` and ``configuration``: the request model and the settings the Lambda reads;
- ``terraform``: the inputs and outputs of the Terraform module in the README's own folder (infra/ and
  each infra/modules/<name>/), every ``variable`` and ``output`` block in declaration order.

The first three stand in exactly one page each; each Terraform module's README holds its own
``terraform`` block, and no other page holds one, so no table is kept in two places.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hcl2
from hcl2.utils import SerializationOptions
from pydantic.fields import FieldInfo

from sd_lambda.serving.request import (
    FromModel,
    GenerationRequest,
    bounds,
    choices,
    decoded_max,
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
INFRA = REPO / "infra"
MAKEFILE = REPO / "Makefile"
# `target: prerequisites ## description` — the same lines `make help` prints.
MAKE_TARGET = re.compile(r"^([A-Za-z0-9_-]+):[^=]*?## (.+)$", re.MULTILINE)
TERRAFORM = "terraform"
# Plain values (strings unquoted, no `${...}` wrapper around a literal) rather than hcl2's round-trip form.
HCL_OPTIONS = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)


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
    encoded = decoded_max(field)
    if encoded is not None:
        return f"base64, up to {encoded.limit(settings)} bytes decoded (max: `{encoded.env}`)"
    low, high = bounds(field, settings)
    text = f"{number(low)} to {number(high)}" if low is not None else f"up to {number(high)}"
    if type_name(field) == "string":
        text += " characters"
    if type_name(field) == "array":
        text += " entries"
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
        rows.append(f"| `make {target}` | {_cell(description)} |")
    return "\n".join(rows)


def _terraform_blocks(module: Path, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, body) of every ``kind`` block (variable, output) of ``module``, in declaration order."""
    blocks: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(module.glob("*.tf")):
        with path.open() as handle:
            try:
                parsed = hcl2.load(handle, serialization_options=HCL_OPTIONS)
            except Exception as exc:  # hcl2 raises lark's errors, of several kinds, for bad syntax
                raise ValueError(f"{path}: not valid HCL: {str(exc).strip().splitlines()[0]}") from exc
        for block in parsed.get(kind, []):
            blocks += [(name.strip('"'), body) for name, body in block.items()]
    return blocks


def _terraform_type(body: dict[str, Any]) -> str:
    text = str(body.get("type", "any"))
    return text[2:-1] if text.startswith("${") and text.endswith("}") else text


def _terraform_default(body: dict[str, Any]) -> str:
    if "default" not in body:
        return "required"
    # JSON spells null, strings, numbers, lists, maps and booleans as HCL does.
    return f"`{json.dumps(body['default'])}`"


def _cell(text: Any) -> str:
    flat = " ".join(str(text).split())
    return flat.replace("|", r"\|")


def _terraform_cell(text: Any) -> str:
    # Type expressions such as map(object({...})) and descriptions may hold `<`, which markdown would
    # read as HTML.
    return _cell(text).replace("<", "&lt;").replace(">", "&gt;")


def terraform_tables(module: Path) -> str:
    """The inputs table and the outputs table of the Terraform module in folder ``module``."""
    rows = ["| Input | Type | Default | Description |", "|---|---|---|---|"]
    for name, body in _terraform_blocks(module, "variable"):
        rows.append(
            f"| `{name}` | `{_terraform_cell(_terraform_type(body))}` | {_terraform_default(body)} "
            f"| {_terraform_cell(body.get('description', ''))} |"
        )
    rows += ["", "| Output | Description |", "|---|---|"]
    for name, body in _terraform_blocks(module, "output"):
        rows.append(f"| `{name}` | {_terraform_cell(body.get('description', ''))} |")
    return "\n".join(rows)


# Block name -> its content, given the folder of the page it stands in.
GENERATORS: dict[str, Callable[[Path], str]] = {
    "request-fields": lambda _folder: request_table(),
    "configuration": lambda _folder: configuration_table(),
    "make-targets": lambda _folder: make_targets_table(),
    TERRAFORM: terraform_tables,
}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- BEGIN generated: {re.escape(name)} -->\n).*?(<!-- END generated: {re.escape(name)} -->)",
        re.DOTALL,
    )


def blocks_in(text: str) -> list[str]:
    """The names of the generated blocks ``text`` holds."""
    return [name for name in GENERATORS if _block(name).search(text)]


def render(text: str, folder: Path = REPO) -> str:
    """``text`` with every generated block it holds replaced by its current content.

    ``folder`` is where the page stands: a ``terraform`` block documents the module in it.
    """
    for name in blocks_in(text):
        content = GENERATORS[name](folder)
        text = _block(name).sub(lambda match, c=content: f"{match[1]}{c}\n{match[2]}", text)
    return text


def terraform_modules() -> list[Path]:
    """The root module and each submodule: every folder whose README carries a ``terraform`` block."""
    return [INFRA, *sorted(path for path in (INFRA / "modules").iterdir() if path.is_dir())]


def documents() -> list[Path]:
    """The pages that may hold generated blocks: the README, docs/*.md and the READMEs under infra/."""
    return [README, *sorted(DOCS.glob("*.md")), *sorted(INFRA.glob("**/README.md"))]


def placement_problems(pages: list[Path], modules: list[Path] | None = None) -> list[str]:
    """Each table stands in one place: a page-wide block in exactly one page, a module's in its README."""
    modules = terraform_modules() if modules is None else modules
    found: dict[str, list[Path]] = {name: [] for name in GENERATORS}
    for page in pages:
        for name in blocks_in(page.read_text()):
            found[name].append(page)
    problems = [
        f"generated block {name!r} is in {len(places)} pages ({', '.join(map(str, places)) or 'none'}); "
        "it belongs in exactly one"
        for name, places in found.items()
        if name != TERRAFORM and len(places) != 1
    ]
    module_readmes = {module / "README.md" for module in modules}
    problems += [
        f"{readme} has no {TERRAFORM!r} block: add an empty one where its inputs and outputs belong"
        for readme in sorted(module_readmes - set(found[TERRAFORM]))
    ]
    problems += [
        f"{page} has a {TERRAFORM!r} block but is not the README of a Terraform module"
        for page in found[TERRAFORM]
        if page not in module_readmes
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sd_lambda.devtools.docs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    parser.add_argument(
        "pages",
        nargs="*",
        type=Path,
        help="pages to render (default: README.md, docs/*.md and the READMEs under infra/)",
    )
    args = parser.parse_args(argv)
    pages = args.pages or documents()
    problems = [] if args.pages else placement_problems(pages)
    for page in pages:
        try:
            current = page.read_text()
            updated = render(current, page.resolve().parent)
        except (OSError, ValueError) as exc:  # a missing page, a module's .tf file that does not parse
            problems.append(f"{page}: {exc}")
            continue
        if updated == current:
            continue
        if args.check:
            problems.append(f"{page} is out of date: run make docs (python -m sd_lambda.devtools.docs)")
        else:
            page.write_text(updated)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
