"""`sd-lambda --help` and every subcommand's `--help` answer without torch, diffusers or transformers:
an operator who seeds, deploys and invokes needs none of them, and each costs seconds to import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sd_lambda.cli import build_parser

HEAVY = ("torch", "diffusers", "transformers")
# Nested actions an operator reaches for, beside every top-level command.
NESTED = (("deploy", "preflight"), ("deploy", "apply"), ("deploy", "plan"), ("deploy", "destroy"))


def _top_level_commands() -> list[tuple[str, ...]]:
    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    return [(name,) for name in subparsers.choices]


def heavy_modules_after(argv: list[str]) -> list[str]:
    """Which of HEAVY a fresh interpreter has imported once ``sd-lambda <argv>`` returned."""
    script = (
        "import json, sys\n"
        "from sd_lambda.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [(), *_top_level_commands(), *NESTED], ids=" ".join)
def test_help_imports_no_torch(command: tuple[str, ...]) -> None:
    assert heavy_modules_after([*command, "--help"]) == []


def test_the_check_sees_torch_when_a_command_loads_it() -> None:
    # `make-test-model --dry` counts parameters with torch: the probe must report it.
    assert "torch" in heavy_modules_after(["make-test-model", "--dry", "--size", "tiny"])
