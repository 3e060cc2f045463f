"""Every generated table (make targets, request fields, configuration, each Terraform module's inputs and
outputs) is rendered by one generator, and a test fails when a page drifts from what it lists."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sd_lambda.devtools import docs
from sd_lambda.serving.request import GenerationRequest
from sd_lambda.settings import documented_variables

REPO = Path(__file__).resolve().parents[2]
EMPTY_TERRAFORM_BLOCK = "<!-- BEGIN generated: terraform -->\n<!-- END generated: terraform -->\n"


def test_every_generated_table_is_up_to_date_and_in_its_one_place(capsys: pytest.CaptureFixture[str]) -> None:
    assert docs.main(["--check"]) == 0, capsys.readouterr().err + "run: make docs"


def test_every_terraform_module_readme_is_rendered() -> None:
    pages = docs.documents()
    for module in docs.terraform_modules():
        readme = module / "README.md"
        assert readme in pages
        assert docs.TERRAFORM in docs.blocks_in(readme.read_text())
    assert {module.name for module in docs.terraform_modules()} >= {"infra", "lambda", "efs", "seeder"}


# ---- make targets -------------------------------------------------------------------------------------


def _help_targets() -> list[str]:
    out = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [re.sub(r"\x1b\[[0-9;]*m", "", line).split()[0] for line in out.splitlines() if line.strip()]


def test_readme_lists_exactly_the_targets_make_help_prints() -> None:
    table = docs.make_targets_table()
    listed = re.findall(r"^\| `make ([\w-]+)` \|", table, re.MULTILINE)
    assert listed == _help_targets()
    assert {"demo", "test", "apply", "seed-models", "bench", "validate", "security", "docs"} <= set(listed)
    assert table in (REPO / "README.md").read_text()


def test_a_new_target_changes_the_table(tmp_path: Path) -> None:
    makefile = tmp_path / "Makefile"
    makefile.write_text("a: ## first | with a pipe\n\t@true\nb: a ## second\n\t@true\nc:\n\t@true\n")
    assert docs.make_targets_table(makefile).splitlines()[2:] == [
        r"| `make a` | first \| with a pipe |",
        "| `make b` | second |",
    ]


# ---- request fields and configuration -----------------------------------------------------------------


def test_request_table_has_every_field_and_its_limits() -> None:
    table = docs.request_table()
    for name in GenerationRequest.model_fields:
        assert f"| `{name}` |" in table
    assert "1 to 50 (max: `SD_MAX_STEPS`)" in table
    assert "**required**" in table


def test_configuration_table_has_every_variable() -> None:
    table = docs.configuration_table()
    for env, default, _ in documented_variables():
        assert f"| `{env}` | `{default}` |" in table


def test_check_reports_drift_and_a_render_repairs_it(tmp_path: Path) -> None:
    original = (docs.DOCS / "api.md").read_text()
    page = tmp_path / "api.md"
    page.write_text(original.replace("| `prompt` |", "| `prompt_old` |"))
    assert docs.main(["--check", str(page)]) == 1
    assert docs.main([str(page)]) == 0
    assert "| `prompt_old` |" not in page.read_text()
    assert page.read_text() == docs.render(original) == original


# ---- Terraform inputs and outputs ---------------------------------------------------------------------


def _module(folder: Path, variables: str, outputs: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "variables.tf").write_text(variables)
    (folder / "outputs.tf").write_text(outputs)
    readme = folder / "README.md"
    readme.write_text(f"# Module\n\n## Inputs and outputs\n\n{EMPTY_TERRAFORM_BLOCK}\nMore prose.\n")
    return readme


def test_a_module_table_lists_its_variables_and_outputs_in_declaration_order(tmp_path: Path) -> None:
    readme = _module(
        tmp_path / "m",
        'variable "size" {\n  description = "Bytes | total"\n  type = number\n  default = 10240\n}\n'
        'variable "name" {\n  type = string\n}\n'
        'variable "tags" {\n  description = "Extra <tags>."\n  type = map(string)\n  default = {}\n}\n'
        'variable "key" {\n  type = string\n  default = null\n}\n',
        'output "arn" {\n  description = "The ARN."\n  value = "x"\n}\n',
    )

    assert docs.main([str(readme)]) == 0

    assert readme.read_text() == (
        "# Module\n\n## Inputs and outputs\n\n<!-- BEGIN generated: terraform -->\n"
        "| Input | Type | Default | Description |\n|---|---|---|---|\n"
        r"| `size` | `number` | `10240` | Bytes \| total |" + "\n"
        "| `name` | `string` | required |  |\n"
        "| `tags` | `map(string)` | `{}` | Extra &lt;tags&gt;. |\n"
        "| `key` | `string` | `null` |  |\n"
        "\n| Output | Description |\n|---|---|\n| `arn` | The ARN. |\n"
        "<!-- END generated: terraform -->\n\nMore prose.\n"
    )


def test_a_changed_variable_makes_its_module_readme_stale(tmp_path: Path) -> None:
    module = tmp_path / "lambda"
    shutil.copytree(
        REPO / "infra" / "modules" / "lambda", module, ignore=shutil.ignore_patterns(".terraform*")
    )
    readme = module / "README.md"
    original = readme.read_text()
    assert docs.main(["--check", str(readme)]) == 0
    variables = module / "variables.tf"
    variables.write_text(variables.read_text().replace('variable "memory_size"', 'variable "memory_mb"', 1))

    assert docs.main(["--check", str(readme)]) == 1
    assert docs.main([str(readme)]) == 0
    assert "| `memory_mb` |" in readme.read_text()
    assert "| `memory_size` |" in original


def test_a_module_readme_without_its_table_and_a_table_outside_a_module_are_refused(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "README.md").write_text("# A module whose README lost its table\n")
    stray = tmp_path / "page.md"
    stray.write_text(EMPTY_TERRAFORM_BLOCK)
    module_readmes = [module / "README.md" for module in docs.terraform_modules()]

    problems = docs.placement_problems(
        [docs.README, docs.DOCS / "api.md", *module_readmes, bare / "README.md", stray],
        [*docs.terraform_modules(), bare],
    )

    assert problems == [
        f"{bare / 'README.md'} has no 'terraform' block: "
        "add an empty one where its inputs and outputs belong",
        f"{stray} has a 'terraform' block but is not the README of a Terraform module",
    ]


def test_a_module_that_does_not_parse_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = _module(tmp_path / "broken", 'variable "x" {\n')

    assert docs.main(["--check", str(readme)]) == 1

    error = capsys.readouterr().err.strip()
    assert error.startswith(f"{readme}: {tmp_path / 'broken' / 'variables.tf'}: not valid HCL")
    assert "\n" not in error


# ---- one place per table ------------------------------------------------------------------------------


def test_a_table_kept_in_two_pages_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "api-copy.md"
    copy.write_text((docs.DOCS / "api.md").read_text())
    pages = [
        docs.README,
        docs.DOCS / "api.md",
        *(module / "README.md" for module in docs.terraform_modules()),
    ]
    assert docs.placement_problems(pages) == []
    problems = docs.placement_problems([*pages, copy])
    assert [problem.split("'")[1] for problem in problems] == ["request-fields", "configuration"]
