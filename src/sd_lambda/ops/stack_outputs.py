"""The deployed stack as Python sees it: the one seam around python-terraform.

Everything that talks to the operator's ``terraform`` goes through here: :func:`read_outputs` (used by
seeding, ``make invoke`` and the deploy driver) and :class:`StackTerraform` (init/plan/apply/destroy for
:mod:`sd_lambda.ops.deploy`). The real ``terraform`` must be on ``PATH``; nothing here downloads it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from python_terraform import IsFlagged, Terraform

from sd_lambda.cli import option

DEFAULT_INFRA_DIR = Path("infra")
TERRAFORM_INSTALL_HINT = (
    "install Terraform >= 1.6 (https://developer.hashicorp.com/terraform/install) and put it on PATH"
)


class StackError(Exception):
    """A one-line, user-facing problem with the stack or the terraform CLI."""


class TerraformNotFoundError(StackError):
    pass


class TerraformCommandError(StackError):
    """A terraform command exited non-zero; ``output`` keeps its whole stderr for callers that recognise
    particular AWS refusals in it (the message keeps only the first ``Error:`` line)."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


class NoOutputsError(StackError):
    pass


def terraform_binary() -> str:
    """Absolute path of ``terraform`` on PATH, or a clear error."""
    binary = shutil.which("terraform")
    if binary is None:
        raise TerraformNotFoundError(f"terraform is not on PATH: {TERRAFORM_INSTALL_HINT}")
    return binary


class StackTerraform:
    """python-terraform bound to one stack directory, with errors turned into :class:`StackError`.

    Commands that change infrastructure stream Terraform's output to the terminal; ``outputs`` captures.
    """

    def __init__(self, infra_dir: Path, env: Mapping[str, str] | None = None) -> None:
        infra_dir = Path(infra_dir)
        if not infra_dir.is_dir():
            raise StackError(f"stack directory {infra_dir} does not exist")
        self.infra_dir = infra_dir
        self.env = dict(env or {})
        binary = terraform_binary()
        try:  # python-terraform parses a local terraform.tfstate itself, on creation and after commands
            self._terraform = Terraform(working_dir=str(infra_dir), terraform_bin_path=binary)
        except json.JSONDecodeError as exc:
            raise StackError(f"the state file in {infra_dir} is not valid JSON: {exc}") from None

    def _run(self, command: str, *args: str, capture: bool, **options: Any) -> tuple[int, str, str]:
        if not capture:
            return self._stream(command, *args, **options)
        saved = {name: os.environ.get(name) for name in self.env}
        # python-terraform hands the process environment to terraform; extra variables go in there.
        os.environ.update(self.env)
        try:
            return self._terraform.cmd(command, *args, no_color=IsFlagged, capture_output=True, **options)
        except json.JSONDecodeError as exc:
            raise StackError(f"the state file in {self.infra_dir} is not valid JSON: {exc}") from None
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def _stream(self, command: str, *args: str, **options: Any) -> tuple[int, str, str]:
        """Run with stdout on the terminal and stderr both shown and kept: an apply's progress must stay
        visible, and its error text is what :mod:`sd_lambda.ops.deploy` recognises (python-terraform either
        captures both streams or neither)."""
        argv = self._terraform.generate_cmd_string(command, *args, no_color=IsFlagged, **options)
        kept: list[str] = []
        try:
            with subprocess.Popen(
                argv,
                cwd=self.infra_dir,
                env={**os.environ, **self.env},
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
            ) as process:
                assert process.stderr is not None
                for line in process.stderr:
                    sys.stderr.write(line)
                    kept.append(line)
            return process.returncode, "", "".join(kept)
        finally:
            self._terraform.temp_var_files.clean_up()  # the .tfvars.json python-terraform wrote for `var`

    def _checked(self, command: str, *args: str, capture: bool = False, **options: Any) -> str:
        code, stdout, stderr = self._run(command, *args, capture=capture, **options)
        if code != 0:
            lines = [line.strip(" │╷╵") for line in (stderr or "").splitlines() if line.strip(" │╷╵")]
            first_error = next(
                (line for line in lines if line.startswith("Error:")), lines[-1] if lines else ""
            )
            detail = f": {first_error}" if first_error else " (see its output above)"
            raise TerraformCommandError(
                f"terraform {command} failed in {self.infra_dir} (exit {code}){detail}", stderr or ""
            )
        return stdout or ""

    def init(self, backend_config: Path | None = None, migrate_state: bool = False) -> None:
        """``terraform init``; with ``backend_config``, an S3 backend configured from that file.

        A committed ``.terraform.lock.hcl`` is used read-only, so every checkout installs the same
        provider builds (upgrading is an explicit ``terraform init -upgrade``). Local state that a new
        backend would leave behind is copied there with ``migrate_state``, and refused without it.
        """
        options: dict[str, Any] = {}
        if (self.infra_dir / LOCK_FILE).is_file():
            options["lockfile"] = "readonly"
        if backend_config is not None:
            if not Path(backend_config).is_file():
                raise StackError(f"{option('--backend-config')} file {backend_config} does not exist")
            pending = local_state_to_migrate(self.infra_dir)
            backend = option("--backend-config")
            if pending and not migrate_state:
                raise StackError(
                    f"{self.infra_dir} has local state ({pending}) and {backend} moves the stack to S3: "
                    f"rerun with {option('--migrate-state')} to copy it there "
                    f"(terraform init -migrate-state), or drop {backend} to keep it local"
                )
            if pending:
                # -force-copy answers terraform's "copy existing state?" question with yes.
                options.update(migrate_state=IsFlagged, force_copy=IsFlagged)
            write_backend_override(self.infra_dir)
            options["backend_config"] = [str(Path(backend_config).resolve())]
        self._checked("init", input=False, **options)

    def plan(
        self,
        variables: Mapping[str, Any],
        var_files: Sequence[Path] = (),
        out: Path | None = None,
        targets: Sequence[str] = (),
    ) -> None:
        """``terraform plan``; with ``out``, saved for :meth:`show_plan` and :meth:`apply_plan`."""
        options = _variable_options(variables, var_files)
        if out is not None:
            options["out"] = str(Path(out).resolve())
        if targets:
            options["target"] = list(targets)
        self._checked("plan", input=False, **options)

    def show_plan(self, plan_file: Path) -> dict[str, Any]:
        """``terraform show -json <plan_file>``: the saved plan's resource changes, values, outputs."""
        stdout = self._checked("show", str(Path(plan_file).resolve()), capture=True, json=IsFlagged)
        try:
            return json.loads(stdout)
        except ValueError as exc:
            raise StackError(f"terraform show -json {plan_file} did not print JSON") from exc

    def apply_plan(self, plan_file: Path) -> None:
        """``terraform apply <plan_file>``: exactly the changes that plan showed, nothing re-planned."""
        self._checked("apply", str(Path(plan_file).resolve()), input=False)

    def apply(
        self, variables: Mapping[str, Any], var_files: Sequence[Path] = (), targets: Sequence[str] = ()
    ) -> None:
        options = _variable_options(variables, var_files)
        if targets:
            options["target"] = list(targets)
        self._checked("apply", input=False, auto_approve=IsFlagged, **options)

    def destroy(self, variables: Mapping[str, Any], var_files: Sequence[Path] = ()) -> None:
        self._checked(
            "destroy", input=False, auto_approve=IsFlagged, **_variable_options(variables, var_files)
        )

    def outputs(self) -> dict[str, Any]:
        """``terraform output -json``, flattened from ``{name: {"value": ...}}`` to ``{name: value}``."""
        stdout = self._checked("output", capture=True, json=IsFlagged)
        try:
            raw = json.loads(stdout or "{}")
        except ValueError as exc:
            raise StackError(f"terraform output -json in {self.infra_dir} did not print JSON") from exc
        return {name: entry.get("value") for name, entry in raw.items()}


def _variable_options(variables: Mapping[str, Any], var_files: Sequence[Path]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if var_files:
        options["var_file"] = [str(Path(path).resolve()) for path in var_files]
    if variables:
        # python-terraform writes a dict of variables to a temporary .tfvars.json: maps and lists survive.
        options["var"] = dict(variables)
    return options


BACKEND_OVERRIDE_FILE = "backend_s3_override.tf"
LOCK_FILE = ".terraform.lock.hcl"
LOCAL_STATE_FILE = "terraform.tfstate"


def local_state_to_migrate(infra_dir: Path) -> str | None:
    """``"<n> resources"`` when ``infra_dir`` keeps state in a local file that is still the one in use
    (the working directory is not yet initialised with the S3 backend), else None."""
    backend_record = Path(infra_dir) / ".terraform" / LOCAL_STATE_FILE  # what `init` last configured
    try:
        if json.loads(backend_record.read_text()).get("backend", {}).get("type") == "s3":
            return None
    except (OSError, ValueError):
        pass
    try:
        state = json.loads((Path(infra_dir) / LOCAL_STATE_FILE).read_text())
    except OSError:
        return None
    except ValueError:
        return "an unreadable terraform.tfstate"
    count = len(state.get("resources") or [])
    return f"{count} resources in {LOCAL_STATE_FILE}" if count else None


def write_backend_override(infra_dir: Path) -> Path:
    """Declare an (empty, partially configured) S3 backend for ``infra_dir``.

    The stack itself declares no backend, so it stays usable as a module and keeps local state by
    default; this override file, ignored by git, switches one checkout to S3 state.
    """
    path = Path(infra_dir) / BACKEND_OVERRIDE_FILE
    path.write_text(
        '# Written by sd-lambda deploy because BACKEND_CONFIG is set.\nterraform {\n  backend "s3" {}\n}\n'
    )
    return path


def read_outputs(infra_dir: Path = DEFAULT_INFRA_DIR, required: Iterable[str] = ()) -> dict[str, Any]:
    """The stack's outputs as ``{name: value}``.

    Raises :class:`TerraformNotFoundError` without terraform on PATH, and :class:`NoOutputsError` when
    the state has no outputs (nothing applied yet) or lacks / has null values for ``required`` names.
    """
    outputs = StackTerraform(infra_dir).outputs()
    if not outputs:
        raise NoOutputsError(f"the stack in {infra_dir} has no outputs: deploy it first (`make apply`)")
    missing = [name for name in required if outputs.get(name) is None]
    if missing:
        raise NoOutputsError(
            f"the stack in {infra_dir} has no value for output(s) {', '.join(missing)}: "
            "run `make apply` (with an image) first"
        )
    return outputs


WEIGHTS_IN_IMAGE = "image"
WEIGHTS_ON_EFS = "efs"


class WeightsInImageError(StackError):
    """The stack serves a model baked into its image (``weights_source = "image"``): nothing to seed."""


def refuse_weights_in_image(outputs: Mapping[str, Any]) -> None:
    """Raise :class:`WeightsInImageError` when ``outputs`` (``terraform output``) say the model lives in
    the function image: seeding, LoRA adapters and EFS release rollback need the EFS the stack lacks.
    A stack applied before ``weights_source`` existed has no such output and is an EFS stack."""
    if outputs.get("weights_source") == WEIGHTS_IN_IMAGE:
        raise WeightsInImageError(
            'this stack bakes the model into the function image (weights_source = "image"), it has no EFS '
            "to seed: rebuild instead, make apply MODEL_DIR=<folder> (or MODEL=owner/name@rev); "
            "make rollback redeploys the previous image"
        )


def output_for_command(infra_dir: Path, name: str, alternative: str) -> str:
    """One output for a CLI command: any StackError becomes a one-line CommandError naming
    ``alternative`` (e.g. ``--url``), the flag that avoids reading the stack."""
    from sd_lambda.cli import CommandError, ask_for

    try:
        return str(read_outputs(infra_dir, required=(name,))[name])
    except StackError as exc:
        raise CommandError(f"{exc} (or {ask_for(alternative, '')})") from None
