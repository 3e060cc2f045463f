"""``terraform init`` as the deploy driver runs it: moving local state to the S3 backend, and the
committed provider lock (read-only for deploys, untouched by the offline tfcheck harness)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from python_terraform import IsFlagged

from sd_lambda.cli import main as cli_main
from sd_lambda.ops.stack_outputs import BACKEND_OVERRIDE_FILE, StackError, StackTerraform

REPO = Path(__file__).resolve().parents[2]
LOCK_HEADER = (
    '# This file is maintained automatically by "terraform init".\n'
    "# Manual edits may be lost in future updates.\n"
)
# A lock as `terraform init` writes it for the root stack (the hash is a placeholder: no provider can be
# downloaded here, and the offline harness replaces hashicorp/aws with its dev_overrides stand-in).
AWS_LOCK = LOCK_HEADER + (
    '\nprovider "registry.terraform.io/hashicorp/aws" {\n'
    '  version     = "6.20.0"\n'
    '  constraints = ">= 6.0.0, < 7.0.0"\n'
    "  hashes = [\n"
    '    "h1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",\n'
    "  ]\n"
    "}\n"
)


class RecordingStack(StackTerraform):
    """The real option building of :meth:`StackTerraform.init`, with terraform itself recorded."""

    def __init__(self, infra_dir: Path) -> None:
        super().__init__(infra_dir)
        self.commands: list[tuple[str, dict[str, Any]]] = []

    def _checked(self, command: str, *args: str, capture: bool = False, **options: Any) -> str:
        self.commands.append((command, options))
        return ""


@pytest.fixture
def stack_dir(tmp_path: Path, terraform_on_path: Path) -> Path:
    directory = tmp_path / "infra"
    directory.mkdir()
    (directory / "main.tf").write_text("")
    return directory


@pytest.fixture
def backend_config(tmp_path: Path) -> Path:
    path = tmp_path / "backend.hcl"
    path.write_text('bucket = "state"\nkey = "sd-lambda.tfstate"\nregion = "eu-west-1"\n')
    return path


def write_local_state(directory: Path, resources: int) -> None:
    state = {"version": 4, "serial": 3, "lineage": "x", "outputs": {}, "resources": []}
    state["resources"] = [
        {"mode": "managed", "type": "aws_s3_bucket", "name": f"r{i}"} for i in range(resources)
    ]
    (directory / "terraform.tfstate").write_text(json.dumps(state))


def test_local_state_is_not_left_behind_silently(stack_dir: Path, backend_config: Path) -> None:
    write_local_state(stack_dir, 3)
    stack = RecordingStack(stack_dir)

    with pytest.raises(StackError) as refused:
        stack.init(backend_config)

    assert str(refused.value) == (
        f"{stack_dir} has local state (3 resources in terraform.tfstate) and --backend-config moves the "
        "stack to S3: rerun with --migrate-state to copy it there (terraform init -migrate-state), or drop "
        "--backend-config to keep it local"
    )
    assert stack.commands == []
    assert not (stack_dir / BACKEND_OVERRIDE_FILE).exists()


def test_migrate_state_copies_local_state_into_the_backend(stack_dir: Path, backend_config: Path) -> None:
    write_local_state(stack_dir, 3)
    stack = RecordingStack(stack_dir)

    stack.init(backend_config, migrate_state=True)

    (command, options), *_ = stack.commands
    assert command == "init"
    assert options["migrate_state"] is IsFlagged
    assert options["force_copy"] is IsFlagged
    assert options["backend_config"] == [str(backend_config.resolve())]
    assert (stack_dir / BACKEND_OVERRIDE_FILE).read_text().count('backend "s3"') == 1


@pytest.mark.parametrize("setup", ["already_on_s3", "empty_local_state", "no_local_state"])
def test_nothing_to_migrate(stack_dir: Path, backend_config: Path, setup: str) -> None:
    if setup == "already_on_s3":  # migrated before: the local file is a left-over, the backend is S3
        write_local_state(stack_dir, 3)
        (stack_dir / ".terraform").mkdir()
        (stack_dir / ".terraform" / "terraform.tfstate").write_text(json.dumps({"backend": {"type": "s3"}}))
    elif setup == "empty_local_state":
        write_local_state(stack_dir, 0)
    stack = RecordingStack(stack_dir)

    stack.init(backend_config)

    assert "migrate_state" not in stack.commands[0][1]


def test_cli_says_how_to_migrate_in_one_line(
    stack_dir: Path, backend_config: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    write_local_state(stack_dir, 2)

    code = cli_main(["deploy", "plan", "--infra", str(stack_dir), "--backend-config", str(backend_config)])

    assert code == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "rerun with --migrate-state to copy it there" in err[0]


def test_make_passes_migrate_state_only_when_1() -> None:
    def dry(*assignments: str) -> str:
        result = subprocess.run(
            ["make", "-n", "--no-print-directory", "apply", *assignments],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    assert "--migrate-state" in dry("MIGRATE_STATE=1", "BACKEND_CONFIG=backend.hcl")
    assert "--migrate-state" not in dry("BACKEND_CONFIG=backend.hcl")


################################################################################
# The provider lock: committed for infra/, read-only for deploys, kept by the offline harness
################################################################################


def test_a_committed_lock_is_used_read_only(stack_dir: Path) -> None:
    stack = RecordingStack(stack_dir)
    stack.init()
    assert "lockfile" not in stack.commands[0][1]  # the first init writes the lock the operator commits

    (stack_dir / ".terraform.lock.hcl").write_text(LOCK_HEADER)
    stack.init()
    assert stack.commands[1][1]["lockfile"] == "readonly"


def test_real_terraform_accepts_the_read_only_lock(terraform_on_path: Path, deploy_stack: Path) -> None:
    (deploy_stack / ".terraform.lock.hcl").write_text(LOCK_HEADER)

    StackTerraform(deploy_stack).init()

    assert (deploy_stack / ".terraform.lock.hcl").read_text() == LOCK_HEADER


def test_the_root_stack_lock_is_not_ignored_by_git() -> None:
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False).returncode == 0

    assert not ignored("infra/.terraform.lock.hcl")
    assert ignored("infra/examples/complete/.terraform.lock.hcl")


@pytest.mark.slow
def test_offline_validate_leaves_a_committed_lock_untouched(tmp_path: Path) -> None:
    from sd_lambda.devtools.tfcheck.runner import validate

    infra = tmp_path / "infra"
    shutil.copytree(REPO / "infra", infra, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    (infra / ".terraform.lock.hcl").write_text(AWS_LOCK)

    result = validate(infra)

    assert [d.summary for d in result.diagnostics if d.severity == "error"] == []
    assert (infra / ".terraform.lock.hcl").read_text() == AWS_LOCK
