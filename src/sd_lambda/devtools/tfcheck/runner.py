"""Run real Terraform core offline against the stub aws provider: init, validate, plan, fmt.

Each Terraform command runs in a child process whose working directory is the directory being checked
(see :mod:`sd_lambda.devtools.tfcheck._terraform` for why). The child gets a CLI configuration whose
``dev_overrides`` point ``hashicorp/aws`` at a generated launcher for
:mod:`sd_lambda.devtools.tfcheck.provider`, and a throw-away ``TF_DATA_DIR`` per check, so checked
directories stay clean and two checks of one
directory (parallel test runs) never share Terraform's working data.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_lambda.devtools.tfcheck.env import DATA_OVERRIDES_ENV, SCHEMA_ENV
from sd_lambda.devtools.tfcheck.schema import DEFAULT_SCHEMA_PATH, SchemaError, load_schema

PROVIDER_EXECUTABLE = "terraform-provider-aws"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[4] / ".cache" / "tfcheck"
COMMAND_TIMEOUT_SECONDS = 600
_BACKEND_BLOCK = re.compile(r'^\s*backend\s+"[^"]+"', re.MULTILINE)
# Override files merge in file-name order: "zz_" sorts after any other override, so this one wins.
_BACKEND_OVERRIDE_FILE = "zz_tfcheck_backend_override.tf"
# Terraform's warning that dev_overrides are active: that is this tool working as designed.
_EXPECTED_WARNING = "Provider development overrides are in effect"


class TfCheckError(Exception):
    """The check itself could not run (no schema, no Terraform files, Terraform crashed)."""


@dataclass(frozen=True)
class Diagnostic:
    severity: str
    summary: str
    detail: str = ""
    filename: str | None = None  # as Terraform reports it: relative to the checked directory
    line: int | None = None

    @classmethod
    def from_terraform(cls, raw: Mapping[str, Any]) -> Diagnostic:
        where = raw.get("range") or {}
        return cls(
            severity=raw.get("severity", "error"),
            summary=raw.get("summary", ""),
            detail=raw.get("detail", "") or "",
            filename=where.get("filename"),
            line=(where.get("start") or {}).get("line"),
        )

    def format(self, directory: Path | None = None) -> str:
        """``file:line: severity: summary — detail``, the file relative to the current directory."""
        location = ""
        if self.filename:
            path = Path(self.filename)
            if directory is not None and not path.is_absolute():
                path = Path(os.path.relpath(Path(directory) / path))
            location = f"{path}:{self.line}: " if self.line else f"{path}: "
        text = f"{location}{self.severity}: {self.summary}"
        detail = " ".join(self.detail.split())
        return f"{text} — {detail}" if detail else text


@dataclass(frozen=True)
class ValidationResult:
    directory: Path
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def valid(self) -> bool:
        return not self.errors


class PlanError(TfCheckError):
    """``terraform plan`` reported errors; ``diagnostics`` says which."""

    def __init__(self, directory: Path, diagnostics: list[Diagnostic]) -> None:
        self.directory = directory
        self.diagnostics = diagnostics
        lines = "\n".join(d.format(directory) for d in diagnostics if d.severity == "error")
        super().__init__(f"terraform plan failed in {directory}:\n{lines}")


@dataclass(frozen=True)
class _Run:
    returncode: int
    stdout: str
    stderr: str


class Workspace:
    """The generated provider launcher, CLI configuration and per-directory Terraform data dirs."""

    def __init__(self, cache_dir: Path = DEFAULT_CACHE_DIR, schema_path: Path = DEFAULT_SCHEMA_PATH) -> None:
        self.cache_dir = Path(cache_dir).resolve()
        self.schema_path = Path(schema_path).resolve()
        if not self.schema_path.is_file():
            raise TfCheckError(
                f"aws provider schema not found at {self.schema_path} "
                "(copy it from the shared terraform folder into tests/data/)"
            )
        self.plugin_dir = self.cache_dir / "plugins"
        self.cli_config = self.cache_dir / "terraformrc"
        self._write_if_changed(
            self.plugin_dir / PROVIDER_EXECUTABLE,
            f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m sd_lambda.devtools.tfcheck.provider "$@"\n',
            mode=0o755,
        )
        self._write_if_changed(
            self.cli_config,
            "provider_installation {\n"
            "  dev_overrides {\n"
            f'    "hashicorp/aws" = {json.dumps(str(self.plugin_dir))}\n'
            "  }\n"
            "  direct {}\n"
            "}\n",
        )

    @staticmethod
    def _write_if_changed(path: Path, content: str, mode: int = 0o644) -> None:
        # Several test processes may share the cache: replace atomically, never half-write.
        if path.is_file() and path.read_text() == content and (path.stat().st_mode & 0o777) == mode:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, delete=False, prefix=f".{path.name}."
        ) as handle:
            handle.write(content)
        os.chmod(handle.name, mode)
        os.replace(handle.name, path)

    def terraform(
        self,
        directory: Path,
        *args: str,
        data_dir: Path | None = None,
        data_overrides: Mapping[str, Any] | None = None,
    ) -> _Run:
        environment = {
            **os.environ,
            "TF_CLI_CONFIG_FILE": str(self.cli_config),
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            "CHECKPOINT_DISABLE": "1",  # no version check over the network
            SCHEMA_ENV: str(self.schema_path),
            DATA_OVERRIDES_ENV: json.dumps(data_overrides or {}),
        }
        if data_dir is not None:
            environment["TF_DATA_DIR"] = str(data_dir)
        command = [sys.executable, "-m", "sd_lambda.devtools.tfcheck._terraform", *args]
        try:
            completed = subprocess.run(
                command,
                cwd=directory,
                env=environment,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TfCheckError(f"terraform {args[0]} in {directory} took over {exc.timeout:.0f}s") from exc
        return _Run(completed.returncode, completed.stdout, completed.stderr)


def _terraform_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.tf"), *directory.glob("*.tf.json")])


def _checked_directory(directory: Path) -> Path:
    resolved = Path(directory).resolve()
    if not resolved.is_dir():
        raise TfCheckError(f"{directory} is not a directory")
    return resolved


def _json_lines_diagnostics(text: str) -> list[Diagnostic]:
    """Diagnostics from Terraform's ``-json`` machine-readable UI stream (init, plan)."""
    diagnostics = []
    for line in text.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("type") == "diagnostic":
            diagnostics.append(Diagnostic.from_terraform(message["diagnostic"]))
    return _relevant(diagnostics)


def _relevant(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    return [d for d in diagnostics if d.summary != _EXPECTED_WARNING]


def _failure(summary: str, run: _Run) -> Diagnostic:
    return Diagnostic("error", summary, (run.stderr or run.stdout).strip())


def _init(
    workspace: Workspace, directory: Path, data_dir: Path, *, backend: bool = False
) -> list[Diagnostic]:
    args = ["init", "-input=false", "-no-color", "-json"]
    args += ["-reconfigure"] if backend else ["-backend=false"]
    # init rewrites .terraform.lock.hcl without the dev-overridden aws provider (and -lockfile=readonly
    # refuses to run): keep the operator's committed lock exactly as it was.
    lock = directory / ".terraform.lock.hcl"
    saved = lock.read_bytes() if lock.is_file() else None
    try:
        run = workspace.terraform(directory, *args, data_dir=data_dir)
    finally:
        if saved is not None:
            lock.write_bytes(saved)
    diagnostics = _json_lines_diagnostics(run.stdout)
    if run.returncode != 0 and not any(d.severity == "error" for d in diagnostics):
        diagnostics.append(_failure("terraform init failed", run))
    return diagnostics


def validate(directory: Path, *, workspace: Workspace | None = None) -> ValidationResult:
    """``terraform init -backend=false`` + ``terraform validate`` in ``directory``, offline.

    A directory without Terraform files is an error, never "valid": validating nothing proves nothing.
    """
    directory = _checked_directory(directory)
    if not _terraform_files(directory):
        missing = Diagnostic("error", "No Terraform files", f"{directory} has no *.tf or *.tf.json files.")
        return ValidationResult(directory, [missing])
    workspace = workspace or Workspace()
    with tempfile.TemporaryDirectory(prefix="tfcheck-data-") as data_dir:
        diagnostics = _init(workspace, directory, Path(data_dir))
        if any(d.severity == "error" for d in diagnostics):
            return ValidationResult(directory, diagnostics)
        run = workspace.terraform(directory, "validate", "-json", "-no-color", data_dir=Path(data_dir))
    try:
        report = json.loads(run.stdout)
        diagnostics += _relevant([Diagnostic.from_terraform(raw) for raw in report.get("diagnostics", [])])
    except ValueError:
        diagnostics.append(_failure("terraform validate produced no JSON report", run))
    if run.returncode != 0 and not any(d.severity == "error" for d in diagnostics):
        diagnostics.append(_failure("terraform validate failed", run))
    return ValidationResult(directory, diagnostics)


def _check_overrides(data_overrides: Mapping[str, Mapping[str, Any]], schema_path: Path) -> None:
    if not data_overrides:
        return
    try:
        schema = load_schema(schema_path)
    except SchemaError as exc:
        raise TfCheckError(str(exc)) from exc
    for type_name, values in data_overrides.items():
        if type_name not in schema.data_sources:
            raise TfCheckError(f"data_overrides: {type_name!r} is not an aws data source")
        attributes = schema.data_source_block(type_name).get("attributes", {})
        for name in values:
            if name not in attributes:
                raise TfCheckError(f"data_overrides: data source {type_name} has no attribute {name!r}")


def plan(
    directory: Path,
    variables: Mapping[str, Any],
    data_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    var_files: Sequence[Path] = (),
    state: Path | None = None,
    workspace: Workspace | None = None,
) -> dict[str, Any]:
    """``terraform plan`` + ``terraform show -json`` for ``directory``: the plan document, as a dict.

    ``variables`` go in as a ``.tfvars.json`` file, after ``var_files`` (so they win). ``data_overrides``
    maps a data source type to attribute values it reads back (``{"aws_region": {"region": ...}}``). A
    ``backend`` block is overridden with a throw-away local backend for the duration of the plan.
    ``state`` plans against an existing (local, v4) state file instead of an empty one, e.g. to see
    what a change to a deployed stack would do. Raises :class:`PlanError` (with diagnostics) when
    Terraform reports errors.
    """
    directory = _checked_directory(directory)
    if not _terraform_files(directory):
        raise TfCheckError(f"{directory} has no *.tf or *.tf.json files to plan")
    workspace = workspace or Workspace()
    _check_overrides(data_overrides or {}, workspace.schema_path)
    with tempfile.TemporaryDirectory(prefix="tfcheck-plan-") as scratch_name:
        scratch = Path(scratch_name)
        override = _backend_override(directory, scratch)
        try:
            data_dir = scratch / "data"
            diagnostics = _init(workspace, directory, data_dir, backend=override is not None)
            if any(d.severity == "error" for d in diagnostics):
                raise PlanError(directory, diagnostics)
            variables_file = scratch / "variables.tfvars.json"
            variables_file.write_text(json.dumps(dict(variables)))
            plan_file = scratch / "offline.tfplan"
            args = ["plan", "-input=false", "-lock=false", "-no-color", "-json", f"-out={plan_file}"]
            args += [f"-var-file={Path(path).resolve()}" for path in var_files]
            if state is not None:
                if not Path(state).is_file():
                    raise TfCheckError(f"state file {state} does not exist")
                args.append(f"-state={Path(state).resolve()}")
            args.append(f"-var-file={variables_file}")
            run = workspace.terraform(directory, *args, data_dir=data_dir, data_overrides=data_overrides)
            diagnostics = _json_lines_diagnostics(run.stdout)
            if run.returncode != 0:
                if not any(d.severity == "error" for d in diagnostics):
                    diagnostics.append(_failure("terraform plan failed", run))
                raise PlanError(directory, diagnostics)
            shown = workspace.terraform(
                directory, "show", "-json", "-no-color", str(plan_file), data_dir=data_dir
            )
        finally:
            if override is not None:
                override.unlink(missing_ok=True)
    if shown.returncode != 0:
        raise TfCheckError(f"terraform show -json failed in {directory}: {shown.stderr.strip()}")
    return json.loads(shown.stdout)


def _backend_override(directory: Path, scratch: Path) -> Path | None:
    """A local backend in ``scratch`` replacing a configured one (an S3 backend cannot work offline)."""
    if not any(_BACKEND_BLOCK.search(path.read_text()) for path in directory.glob("*.tf")):
        return None
    override = directory / _BACKEND_OVERRIDE_FILE
    state = json.dumps(str(scratch / "terraform.tfstate"))
    override.write_text(f'terraform {{\n  backend "local" {{\n    path = {state}\n  }}\n}}\n')
    return override


def fmt_check(directory: Path, *, workspace: Workspace | None = None) -> list[str]:
    """Files under ``directory`` (recursive) that ``terraform fmt`` would change, relative to it."""
    directory = _checked_directory(directory)
    workspace = workspace or Workspace()
    run = workspace.terraform(directory, "fmt", "-check", "-recursive", "-list=true", "-no-color")
    files = [line.strip() for line in run.stdout.splitlines() if line.strip()]
    if run.returncode not in (0, 3) or (run.returncode == 3 and not files):
        raise TfCheckError(f"terraform fmt could not check {directory}: {(run.stderr or run.stdout).strip()}")
    return files


def plan_summary(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(resource address, actions) for every change in a ``terraform show -json`` plan document."""
    return [
        (change["address"], "+".join(change["change"]["actions"]))
        for change in document.get("resource_changes", [])
    ]
