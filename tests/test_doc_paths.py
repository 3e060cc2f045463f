"""Every path the documentation cites exists in the repository: links and `src/...`-style code spans."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "infra").glob("**/README.md")),
]
# A relative markdown link: [text](target), without a scheme or a bare anchor.
LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)(?:#[^)]*)?\)")
# A code span that names a file or folder of the repository from its root.
CODE_PATH = re.compile(r"`((?:src|infra|docs|tests|scripts|image)/[A-Za-z0-9_./-]*[A-Za-z0-9_/])`")
# Written by the operator's first `terraform init` and then committed (docs/deploy.md, the lock file policy).
WRITTEN_BY_FIRST_INIT = {"infra/.terraform.lock.hcl"}


def written_at_run_time(path: str) -> bool:
    """A file the tools write in a checkout (state, overrides): git ignores it, so it cannot be shipped."""
    if path in WRITTEN_BY_FIRST_INIT:
        return True
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, check=False)
    return ignored.returncode == 0


def cited_paths(page: Path) -> list[tuple[str, Path]]:
    text = page.read_text()
    cited = [(target, (page.parent / target).resolve()) for target in LINK.findall(text)]
    cited += [
        (path, REPO / path)
        for path in CODE_PATH.findall(text)
        if "*" not in path and "<" not in path and not written_at_run_time(path)
    ]
    return cited


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_cited_path_exists(page: Path) -> None:
    missing = [cited for cited, path in cited_paths(page) if not path.exists()]
    assert not missing, f"{page.relative_to(REPO)} cites paths that do not exist: {missing}"


def test_the_check_sees_a_missing_path(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "See [the guide](nowhere.md), `src/sd_lambda/no_such_module.py` and `infra/terraform.tfstate`.\n"
    )
    assert [cited for cited, path in cited_paths(page) if not path.exists()] == [
        "nowhere.md",
        "src/sd_lambda/no_such_module.py",
    ]
