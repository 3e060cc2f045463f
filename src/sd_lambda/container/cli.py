"""``sd-lambda requirements | build-image | push-image``: the container image's operator commands."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_PYPROJECT = Path("pyproject.toml")
DEFAULT_LOCK = Path("image/requirements.txt")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "requirements",
        help="regenerate (or --check) image/requirements.txt from pyproject's base dependencies",
        description="Resolve pyproject's base dependencies with pip and write the image's pinned lock.",
    )
    parser.add_argument("--pyproject", type=Path, default=DEFAULT_PYPROJECT)
    parser.add_argument("--output", type=Path, default=DEFAULT_LOCK)
    parser.add_argument(
        "--check", action="store_true", help="only verify the existing lock against pyproject (offline)"
    )
    parser.add_argument(
        "--torch-index-url",
        action="append",
        default=[],
        help="extra index to resolve the CPU torch build from (e.g. https://download.pytorch.org/whl/cpu)",
    )
    parser.set_defaults(func=run_requirements)


def run_requirements(args: argparse.Namespace) -> int:
    from sd_lambda.cli import CommandError
    from sd_lambda.container import requirements

    if not args.pyproject.is_file():
        raise CommandError(f"{args.pyproject} not found (run from the repository root)")
    dependencies = requirements.ProjectDependencies.from_pyproject(args.pyproject)
    try:
        if args.check:
            if not args.output.is_file():
                raise CommandError(f"{args.output} not found: run `make requirements`")
            problems = requirements.check(requirements.parse(args.output.read_text()), dependencies)
            if problems:
                raise CommandError(f"{args.output} is out of date: {'; '.join(problems)}")
            print(f"{args.output} matches {args.pyproject}")
            return 0
        entries, environment = requirements.resolve(dependencies.base, extra_index_urls=args.torch_index_url)
    except requirements.RequirementsError as exc:
        raise CommandError(str(exc)) from exc
    problems = requirements.check(entries, dependencies)
    if problems:
        raise CommandError(f"the resolution does not satisfy pyproject: {'; '.join(problems)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(requirements.render(entries, environment))
    print(f"wrote {len(entries)} pinned packages to {args.output}")
    return 0
