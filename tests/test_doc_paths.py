"""Every path the documentation cites exists in the repository: links, `src/...`-style code spans,
`sd_lambda.x.y` module names, and the test files and tests it names. docs/architecture.md's code map
has one row per package of the real tree, and the README stays short and links every page of docs/."""

import ast
import io
import itertools
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "sd_lambda"
TESTS = REPO / "tests"
ARCHITECTURE = REPO / "docs" / "architecture.md"
PAGES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "infra").glob("**/README.md")),
]
# A relative markdown link: [text](target), without a scheme or a bare anchor.
LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)(?:#[^)]*)?\)")
# A code span that names a file or folder of the repository from its root.
CODE_PATH = re.compile(r"`((?:src|infra|docs|tests|scripts|image)/[A-Za-z0-9_./-]*[A-Za-z0-9_/])`")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# A dotted name inside a code span: a module (`sd_lambda.serving.handler`) or something defined in one
# (`sd_lambda.serving.handler.handler`, `python -m sd_lambda.devtools.docs`).
DOTTED = re.compile(r"(?<![\w/.-])sd_lambda(?:\.[A-Za-z_]\w*)+")
# A test file, optionally with a test in it: `serving/test_service.py::test_x` (paths are relative to
# tests/), `test_layout.py` (a bare name: anywhere under tests/), `test_x.py::test_some_prefix_...`.
TEST_CITATION = re.compile(r"`((?:tests/)?(?:[\w/]+/)?(test_\w+\.py))(?:::(test_\w+)(\.\.\.)?)?")
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


def module_source(dotted: str, src: Path = SRC) -> Path | None:
    """The file of module or package ``dotted`` under ``src``, found without importing it."""
    base = src.joinpath(*dotted.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def defines(source: str, name: str) -> bool:
    """Whether ``source`` defines or imports ``name`` (a function, class, assignment or import)."""
    definition = rf"(?:async\s+)?def\s+{name}\b|class\s+{name}\b|{name}\s*[:=]"
    pattern = rf"^\s*(?:{definition}|(?:from\s.*)?import\s.*\b{name}\b)"
    return re.search(pattern, source, re.MULTILINE) is not None


def dotted_name_exists(dotted: str, src: Path = SRC) -> bool:
    """``dotted`` is a module, or names defined in the longest module it starts with."""
    parts = dotted.split(".")
    for length in range(len(parts), 0, -1):
        source = module_source(".".join(parts[:length]), src)
        if source is not None:
            text = source.read_text()
            return all(defines(text, name) for name in parts[length:])
    return False


def cited_dotted_names(page: Path) -> list[str]:
    return [name for span in CODE_SPAN.findall(page.read_text()) for name in DOTTED.findall(span)]


def cited_test_exists(path: str, name: str, test: str | None, prefix: str | None) -> bool:
    """A cited test file exists (a bare name anywhere under tests/), and so does the test it names."""
    if "/" in path:
        files = [REPO / path if path.startswith("tests/") else TESTS / path]
    else:
        files = list(TESTS.rglob(name))
    files = [file for file in files if file.is_file()]
    if test is None:
        return bool(files)
    definition = rf"^\s*def {test}" + ("" if prefix else r"\b")
    return any(re.search(definition, file.read_text(), re.MULTILINE) for file in files)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_cited_path_exists(page: Path) -> None:
    missing = [cited for cited, path in cited_paths(page) if not path.exists()]
    assert not missing, f"{page.relative_to(REPO)} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_cited_module_exists(page: Path) -> None:
    missing = [name for name in cited_dotted_names(page) if not dotted_name_exists(name)]
    assert not missing, f"{page.relative_to(REPO)} names modules or objects that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_cited_test_exists(page: Path) -> None:
    missing = [
        "::".join(filter(None, (path, test)))
        for path, name, test, prefix in TEST_CITATION.findall(page.read_text())
        if not cited_test_exists(path, name, test or None, prefix or None)
    ]
    assert not missing, f"{page.relative_to(REPO)} cites tests that do not exist: {missing}"


def test_the_check_sees_a_missing_path(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "See [the guide](nowhere.md), `src/sd_lambda/no_such_module.py` and `infra/terraform.tfstate`.\n"
    )
    assert [cited for cited, path in cited_paths(page) if not path.exists()] == [
        "nowhere.md",
        "src/sd_lambda/no_such_module.py",
    ]


def test_the_check_sees_a_missing_module_or_object(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sd_lambda" / "serving").mkdir(parents=True)
    (src / "sd_lambda" / "__init__.py").write_text("")
    (src / "sd_lambda" / "serving" / "__init__.py").write_text("from .handler import handler\n")
    (src / "sd_lambda" / "serving" / "handler.py").write_text(
        "SETTINGS = 1\n\ndef handler(event):\n    pass\n"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "`python -m sd_lambda.serving.handler`, `sd_lambda.serving.handler.handler`, "
        "`sd_lambda.serving.handler.SETTINGS`, `sd_lambda.serving.handler`, `sd_lambda.serving.handle`, "
        "`sd_lambda.serving.handler.PREDICTOR` and `src/sd_lambda.egg-info`.\n"
    )
    names = cited_dotted_names(page)
    assert [name for name in names if not dotted_name_exists(name, src)] == [
        "sd_lambda.serving.handle",
        "sd_lambda.serving.handler.PREDICTOR",
    ]
    assert len(names) == 6


def test_the_check_sees_a_missing_test() -> None:
    assert cited_test_exists("serving/test_service.py", "test_service.py", None, None)
    assert cited_test_exists("test_layout.py", "test_layout.py", None, None)
    assert not cited_test_exists("handler/test_service.py", "test_service.py", None, None)
    assert not cited_test_exists("test_no_such_file.py", "test_no_such_file.py", None, None)
    assert not cited_test_exists("test_layout.py", "test_layout.py", "test_no_such_test", None)
    assert cited_test_exists("tests/test_doc_paths.py", "test_doc_paths.py", "test_the_check_", "...")


# ---- paths the source's docstrings and comments cite --------------------------------------------------

# A repository path written in prose (``docs/api.md``, ``infra/modules/<name>/``, ``docs/*.md``).
SOURCE_PATH = re.compile(r"(?<![\w/.-])((?:docs|shared|src|infra|tests|image|scripts)/[\w./<>*-]*[\w/>*])")
# A named Terraform variables file (``offline.auto.tfvars``); not a glob (``*.auto.tfvars``).
TFVARS_FILE = re.compile(r"(?<![\w/.*<>-])([\w-][\w.-]*\.tfvars(?:\.json)?)\b")
# Terraform's own names for the operator's variables files, not files of this repository.
TERRAFORM_VARIABLES_FILES = {"terraform.tfvars", "terraform.tfvars.json"}


def prose_of(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of each comment and docstring of a Python file."""
    prose = [
        (token.start[0], token.string)
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                prose.append((node.body[0].lineno, docstring))
    return prose


def missing_source_citations(source: str, repo: Path = REPO) -> list[str]:
    """The paths and tfvars files ``source``'s prose cites that the repository does not have (a git-ignored
    file the tools or the operator write counts as had; ``<name>`` and ``*`` must match something)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True)
    names = {Path(path).name for path in tracked.stdout.splitlines()}
    missing = []
    for line, text in prose_of(source):
        for path in SOURCE_PATH.findall(text):
            pattern = re.sub(r"<[^>]*>", "*", path).rstrip("/")
            found = any(repo.glob(pattern)) if "*" in pattern else (repo / pattern).exists()
            if not found and not written_at_run_time(path):
                missing.append(f"{line}: {path}")
        for name in TFVARS_FILE.findall(text):
            if name not in names | TERRAFORM_VARIABLES_FILES and not written_at_run_time(f"infra/{name}"):
                missing.append(f"{line}: {name}")
    return sorted(missing, key=lambda entry: int(entry.split(":")[0]))


@pytest.mark.parametrize("source", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(SRC)))
def test_every_path_a_docstring_or_comment_cites_exists(source: Path) -> None:
    assert missing_source_citations(source.read_text()) == []


def test_the_source_check_sees_a_missing_path_and_tfvars_file() -> None:
    source = (
        '"""See ``shared/design/efs-model-layout.md`` and docs/api.md."""\n'
        "# examples use their offline.auto.tfvars; tests/infra/offline.tfvars; infra/modules/<name>/\n"
        "# the operator's terraform.tfvars and every *.auto.tfvars\n"
    )
    missing = ["1: shared/design/efs-model-layout.md", "2: offline.auto.tfvars"]
    assert missing_source_citations(source) == missing


# ---- the code map of docs/architecture.md --------------------------------------------------------------


def code_map_rows(text: str) -> dict[str, str]:
    """``path -> job`` for each row of the page's "Code map" table."""
    section = text.split("\n## Code map\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(src/sd_lambda/[^`]*)` \|(.*)\|$", section, re.MULTILINE))


def test_the_code_map_has_one_row_per_package_and_top_level_module() -> None:
    packages = {
        f"{init.parent.relative_to(REPO)}/" for init in PACKAGE.rglob("__init__.py") if init.parent != PACKAGE
    }
    modules = {
        str(module.relative_to(REPO)) for module in PACKAGE.glob("*.py") if module.name != "__init__.py"
    }
    assert set(code_map_rows(ARCHITECTURE.read_text())) == packages | modules


def test_every_module_a_code_map_row_names_is_in_that_package() -> None:
    rows = code_map_rows(ARCHITECTURE.read_text())
    named = [
        (path, module)
        for path, job in rows.items()
        if path.endswith("/")
        for module in re.findall(r"`(\w+\.py)`", job)
    ]
    assert len(named) > 20
    assert [f"{path}{module}" for path, module in named if not (REPO / path / module).is_file()] == []


# ---- the README leads ---------------------------------------------------------------------------------

README_BUDGET_BYTES = 20 * 1024


def test_the_readme_stays_within_its_budget() -> None:
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_BUDGET_BYTES, f"README.md is {size} bytes; move detail into docs/"


def test_the_readme_links_every_page_under_docs() -> None:
    linked = {
        target for target in LINK.findall((REPO / "README.md").read_text()) if target.startswith("docs/")
    }
    pages = {str(page.relative_to(REPO)) for page in (REPO / "docs").glob("*.md")}
    assert pages - linked == set(), "add each page to the README's documentation table"


# ---- the part diagram of docs/architecture.md ----------------------------------------------------------


def diagram_parts_and_edges(text: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    """The first mermaid block's ``node -> subgraph`` and its arrows as ``(from, to)`` node pairs."""
    diagram = text.split("```mermaid\n", 1)[1].split("```", 1)[0]
    part_of, part, edges = {}, "", set()
    for line in diagram.splitlines():
        line = line.strip()
        if opened := re.match(r"subgraph (\w+)", line):
            part = opened.group(1)
        elif line == "end":
            part = ""
        elif defined := re.fullmatch(r'(\w+)\[".*"\]', line):
            part_of[defined.group(1)] = part
        elif "-->" in line or ".->" in line:
            # a -- "label" --> b, a -. "label" .-> b, a --> b --> c, a & b --> c & d
            plain = re.sub(r'(?:--|-\.)\s*"[^"]*"\s*(?:-->|\.->)|-\.->', "-->", line)
            ends = [[node.strip() for node in segment.split("&")] for segment in plain.split("-->")]
            edges |= {(a, b) for left, right in itertools.pairwise(ends) for a in left for b in right}
    return part_of, edges


def diagram_node(module: str, nodes: set[str]) -> str | None:
    """``sd_lambda.engine.accel.prefetch`` -> ``accel``: the deepest package (or top-level module) that
    is a node of the diagram."""
    parts = module.split(".")[1:]
    node = parts[0] if parts and parts[0] in nodes else None
    if node and len(parts) > 1 and parts[1] in nodes and (PACKAGE / parts[0] / parts[1]).is_dir():
        node = parts[1]
    return node


def test_the_architecture_diagram_draws_every_import_between_parts() -> None:
    """The page says its arrows are the only imports between parts: each import (lazy ones included)
    from one part's module into another part's has an arrow between those parts."""
    part_of, edges = diagram_parts_and_edges(ARCHITECTURE.read_text())
    nodes = set(part_of)
    assert {"serving", "engine", "accel", "settings", "layout", "cli", "ops", "devtools"} <= nodes
    drawn = {(part_of[a], part_of[b]) for a, b in edges}
    undrawn = set()
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts)
        importer = diagram_node(module, nodes)
        for statement in ast.walk(ast.parse(path.read_text())):
            if isinstance(statement, ast.ImportFrom) and statement.module and not statement.level:
                names = [statement.module] + [f"{statement.module}.{alias.name}" for alias in statement.names]
            elif isinstance(statement, ast.Import):
                names = [alias.name for alias in statement.names]
            else:
                continue
            for name in names:
                imported = diagram_node(name, nodes) if name.startswith("sd_lambda.") else None
                crossing = importer and imported and part_of[importer] != part_of[imported]
                if crossing and (part_of[importer], part_of[imported]) not in drawn:
                    undrawn.add(f"{module} -> {name}")
    assert sorted(undrawn) == []
