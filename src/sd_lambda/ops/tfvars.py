"""The value Terraform will give a root variable, known before Terraform runs (for the deploy preflight).

Terraform's precedence, lowest first: the variable's ``default``, ``TF_VAR_<name>``, ``terraform.tfvars``,
``terraform.tfvars.json``, ``*.auto.tfvars[.json]`` in lexical order, then ``-var-file``/``-var`` in
command-line order (https://developer.hashicorp.com/terraform/language/values/variables#variable-definition-precedence).
The driver passes ``--var`` values after the var files, so they win here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


class VariablesError(Exception):
    """A var file that cannot be read or parsed: one line naming the file."""


def _hcl(text: str) -> dict[str, Any]:
    import hcl2
    from hcl2.utils import SerializationOptions

    options = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
    return dict(hcl2.loads(text, serialization_options=options))


def _load(path: Path) -> dict[str, Any]:
    try:
        if path.name.endswith(".json"):
            return dict(json.loads(path.read_text()))
        return _hcl(path.read_text())
    except FileNotFoundError:
        raise VariablesError(f"var file {path} does not exist") from None
    except Exception as exc:  # hcl2 raises lark errors of several kinds for bad syntax
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VariablesError(f"cannot parse {path}: {first_line}") from None


def expression(name: str, text: str) -> Any:
    """A ``--var`` or ``TF_VAR_`` value of a map or list variable: Terraform reads it as an HCL expression."""
    try:
        return _hcl(f"value = {text}\n")["value"]
    except Exception as exc:  # hcl2's lark errors, as in _load
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VariablesError(f"cannot parse {name}={text}: {first_line}") from None


def declared_defaults(infra_dir: Path) -> dict[str, Any]:
    """``{name: default}`` of every variable declared in ``infra_dir``/*.tf (None when it has none)."""
    defaults: dict[str, Any] = {}
    for path in sorted(Path(infra_dir).glob("*.tf")):
        for block in _load(path).get("variable", []):
            for name, body in block.items():
                defaults[name] = body.get("default")
    return defaults


def _automatic_files(infra_dir: Path) -> list[Path]:
    infra_dir = Path(infra_dir)
    fixed = [infra_dir / "terraform.tfvars", infra_dir / "terraform.tfvars.json"]
    auto = sorted([*infra_dir.glob("*.auto.tfvars"), *infra_dir.glob("*.auto.tfvars.json")])
    return [path for path in [*fixed, *auto] if path.is_file()]


def _from_cli(value: Any) -> Any:
    """A ``--var`` string as Terraform reads it for a number or null variable (strings pass through)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text == "null":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return value


def effective_values(
    infra_dir: Path,
    names: Iterable[str],
    var_files: Sequence[Path] = (),
    variables: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The values ``names`` will have in a plan of ``infra_dir`` with these var files and ``--var``s."""
    wanted = list(names)
    defaults = declared_defaults(infra_dir)
    values = {name: defaults.get(name) for name in wanted}
    environment = os.environ if environ is None else environ
    for name in wanted:
        if f"TF_VAR_{name}" in environment:
            values[name] = _from_cli(environment[f"TF_VAR_{name}"])
    for path in [*_automatic_files(infra_dir), *map(Path, var_files)]:
        loaded = _load(path)
        values.update({name: loaded[name] for name in wanted if name in loaded})
    for name, value in (variables or {}).items():
        if name in values:
            values[name] = _from_cli(value)
    return values
