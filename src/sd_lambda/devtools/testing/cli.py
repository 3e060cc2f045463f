"""sd-lambda make-test-model: write a random-weight pipeline for tests, the demo and benchmarks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sd_lambda.devtools.testing.models import SPECS, build_test_model, parameter_counts


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-test-model",
        help="write a random-weight Stable Diffusion pipeline (offline)",
        description=__doc__,
    )
    parser.add_argument("-o", "--output", type=Path, help="the folder to write (not needed with --dry)")
    parser.add_argument("--size", choices=sorted(SPECS), default="tiny", help="which test pipeline")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--no-tiny-decoder", action="store_true", help="do not write vae_tiny/")
    parser.add_argument(
        "--bf16-copy",
        action="store_true",
        help="also write the weights' bf16 copy (sd_lambda.engine.accel.bf16_copy)",
    )
    parser.add_argument(
        "--dry", action="store_true", help="print parameter counts (meta device, no weights) and exit"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sd_lambda.cli import CommandError

    if args.dry:
        print(json.dumps(parameter_counts(args.size), indent=2))
        return 0
    if args.output is None:
        raise CommandError("an output folder is required: pass -o/--output DIR (or use --dry)")
    if args.output.exists() and any(args.output.iterdir()):
        raise CommandError(f"{args.output} exists and is not empty")
    build_test_model(args.output, args.size, seed=args.seed, tiny_decoder=not args.no_tiny_decoder)
    if args.bf16_copy:
        from sd_lambda.engine.accel.bf16_copy import add_bf16_copy

        add_bf16_copy(args.output)
    print(f"wrote {args.size} test model to {args.output}")
    return 0
