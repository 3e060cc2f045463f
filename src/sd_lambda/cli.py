"""``sd-lambda``: one console script, one subcommand per job.

Each subcommand lives in the module that does the work; that module exposes
``register(subparsers)`` which adds its parser and sets ``func`` (returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

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


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (or ``exit_code``)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-lambda", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"sd-lambda {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"sd-lambda {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
