"""``sd-lambda``: one console script, one subcommand per job.

Each subcommand lives in the module that does the work; that module exposes
``register(subparsers)`` which adds its parser and sets ``func`` (returns an exit code).

One vocabulary for every command: ``--infra`` (the Terraform root), ``-o/--output`` (every file a command
writes), ``--json`` (one JSON document on stdout, human lines on stderr). Each make target passes its
variables one-to-one to these flags (:data:`MAKE_VARIABLES`); run from make, errors name the variable.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

# Modules that contribute subcommands, in `sd-lambda --help` order.
COMMAND_MODULES: tuple[str, ...] = (
    "sd_lambda.devtools.testing.cli",
    "sd_lambda.devtools.tfcheck.cli",
    "sd_lambda.ops.container.cli",
    "sd_lambda.ops.client",
    "sd_lambda.devtools.local.cli",
    "sd_lambda.ops.deploy",
    "sd_lambda.seeding.cli",
    "sd_lambda.devtools.bench",
)

# The Makefile sets this on every sd-lambda it runs, so that messages name the make variable to set.
FROM_MAKE_ENV = "SD_LAMBDA_FROM_MAKE"
# Where the operator commands keep hub downloads, exports and build contexts (--work-dir).
WORK_DIR = Path.home() / ".cache" / "sd-lambda"
# The one table of flag -> make variable (the Makefile passes each variable to its flag).
MAKE_VARIABLES: Mapping[str, str] = {
    "--infra": "INFRA",
    "--output": "OUT",
    "--prompt": "PROMPT",
    "--model-dir": "MODEL_DIR",
    "--region": "REGION",
    "--var-file": "TFVARS",
    "--image-uri": "IMAGE_URI",
    "--name": "NAME",
    "--revision": "REVISION",
    "--model": "MODEL",
    "--from-dir": "FROM_DIR",
    "--from-s3": "FROM_S3",
    "--lora": "LORA",
    "--lora-name": "LORA_NAME",
    "--json": "JSON=1",
    "--job": "JOB=1",
    "--job-timeout": "JOB_TIMEOUT",
    "--url": "URL",
    "--port": "PORT",
    "--backend-config": "BACKEND_CONFIG",
    "--migrate-state": "MIGRATE_STATE=1",
    "--allow-function-delete": "ALLOW_FUNCTION_DELETE=1",
    "--allow-data-loss": "ALLOW_DATA_LOSS=1",
    "--switch-weights-source": "SWITCH_WEIGHTS_SOURCE=1",
    "--yes": "CONFIRM=1",
    "--bf16-copy": "BF16_COPY=1",
    "--export": "EXPORT",
    "--quantize": "QUANTIZE",
    "--weight-format": "WEIGHT_FORMAT",
    "--not-served": "NOT_SERVED=1",
    "--docker": "DOCKER",
    "--platform": "PLATFORM",
    "--engine": "ENGINE",
    "--image": "IMAGE",
    "--repository-url": "REPOSITORY_URL",
}


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (or ``exit_code``)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def from_make() -> bool:
    return os.environ.get(FROM_MAKE_ENV) == "1"


def option(flag: str) -> str:
    """How the user sets ``flag``: its make variable (``PROMPT=``, ``CONFIRM=1``) when run from make and
    the Makefile has one, else the flag itself."""
    variable = MAKE_VARIABLES.get(flag) if from_make() else None
    if variable is None:
        return flag
    return variable if "=" in variable else f"{variable}="


def ask_for(flag: str, example: str = "...") -> str:
    """The words that ask for a value: ``set PROMPT="<example>"`` from make, else ``pass --prompt <example>``
    (no example: ``set URL=`` / ``pass --url``)."""
    named = option(flag)
    if named == flag:
        return f"pass {flag} {example}".rstrip() if " " not in example else f'pass {flag} "{example}"'
    return f'set {named}"{example}"' if named.endswith("=") and example else f"set {named}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except the ones that mean "not given"."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        # A path or flag stays whole when a line wraps: `.venv-export/bin/python`, never `.venv-` + `export`.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every sd-lambda parser; subparsers inherit the class, so every ``--help`` shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("formatter_class", HelpFormatter)
        if not issubclass(given, HelpFormatter):  # e.g. RawDescriptionHelpFormatter: keep it, add defaults
            given = type(f"Defaults{given.__name__}", (HelpFormatter, given), {})
        kwargs["formatter_class"] = given
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        # An option without help text still shows its default.
        if kwargs.get("help") is None and kwargs.get("default") not in (None, False, []):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON document on stdout (progress and notes go to stderr)",
    )


def report(args: argparse.Namespace, document: Mapping[str, Any], lines: Iterable[str]) -> None:
    """A command's result: with ``--json`` the document on stdout, else ``lines`` for people."""
    stream: TextIO = getattr(args, "result_stream", None) or sys.stdout
    if getattr(args, "json", False):
        print(json.dumps(document, sort_keys=True, default=str), file=stream, flush=True)
    else:
        for line in lines:
            print(line, file=stream, flush=True)


def _writes_to_fd_1(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 1
    except (AttributeError, OSError, ValueError):  # a StringIO, pytest's capture: not a file descriptor
        return False


@contextlib.contextmanager
def _stdout_kept_for_the_result(args: argparse.Namespace) -> Iterator[None]:
    """With ``--json``, everything printed while the command runs (its own lines, and terraform's or
    docker's output on file descriptor 1) goes to stderr; :func:`report` writes to the real stdout."""
    args.result_stream = sys.stdout
    if not getattr(args, "json", False):
        yield
        return
    sys.stdout.flush()
    try:
        saved_fd = os.dup(1)
    except OSError:  # no file descriptor 1: only Python's own prints can be redirected
        saved_fd = None
    result = None
    if saved_fd is not None:
        if _writes_to_fd_1(sys.stdout):
            # sys.stdout writes to descriptor 1, which is about to point at stderr: the result gets its
            # own descriptor for what 1 is now (the terminal, the pipe to jq).
            result = os.fdopen(os.dup(saved_fd), "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors)
            args.result_stream = result
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if result is not None:
            result.close()
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sd-lambda",
        description="One console script for the project: build, deploy, seed and call the function, and the "
        "developer tools. Each command's --help tells more.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _stdout_kept_for_the_result(args):
            return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"sd-lambda {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"sd-lambda {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        # Commands import what only their own install brings when they run, never to build the parser.
        missing = (exc.name or "").split(".")[0]
        if not missing or missing == "sd_lambda":
            raise
        print(
            f"sd-lambda {args.command}: error: {_install_for(args)} ({missing} is not installed)",
            file=sys.stderr,
        )
        return 1


def _install_for(args: argparse.Namespace) -> str:
    if getattr(args.func, "__module__", "").startswith("sd_lambda.devtools."):
        return "needs the dev install: make install"
    return "needs the operator install: make install-ops"


if __name__ == "__main__":
    # `python -m sd_lambda.cli`: this module runs as __main__, a second copy; the commands raise
    # sd_lambda.cli's CommandError, so that module's main must catch it.
    from sd_lambda.cli import main as package_main

    sys.exit(package_main())
