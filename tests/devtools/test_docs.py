"""README's make-target table is generated from the same `## ` comments `make help` prints."""

import re
import subprocess
from pathlib import Path

from sd_lambda.devtools import docs

REPO = Path(__file__).resolve().parents[2]


def _help_targets() -> list[str]:
    out = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [re.sub(r"\x1b\[[0-9;]*m", "", line).split()[0] for line in out.splitlines() if line.strip()]


def test_readme_lists_exactly_the_targets_make_help_prints() -> None:
    table = docs.make_targets_table()
    listed = re.findall(r"^\| `make ([\w-]+)` \|", table, re.MULTILINE)
    assert listed == _help_targets()
    assert {"demo", "test", "apply", "seed-models", "bench", "validate", "security"} <= set(listed)
    assert table in (REPO / "README.md").read_text()


def test_a_new_target_changes_the_table(tmp_path: Path) -> None:
    makefile = tmp_path / "Makefile"
    makefile.write_text("a: ## first | with a pipe\n\t@true\nb: a ## second\n\t@true\nc:\n\t@true\n")
    assert docs.make_targets_table(makefile).splitlines()[2:] == [
        r"| `make a` | first \| with a pipe |",
        "| `make b` | second |",
    ]
