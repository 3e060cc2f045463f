"""Each make target passes its variables one-to-one to the sd-lambda flags (dry runs: `make -n`)."""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from sd_lambda.cli import FROM_MAKE_ENV, MAKE_VARIABLES

REPO = Path(__file__).resolve().parents[2]
IMAGE_URI = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd@sha256:abc"


def dry_run(target: str, *assignments: str) -> list[str]:
    """The words of the one ``sd-lambda`` command ``make -n target`` would run."""
    make = shutil.which("make")
    assert make, "make is required"
    result = subprocess.run(
        [make, "-n", "--no-print-directory", target, *assignments],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in result.stdout.replace("\\\n", " ").splitlines() if "bin/sd-lambda " in line]
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0])


def flag_value(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words else None


def _flag_of(variable: str) -> str:
    return next(flag for flag, name in MAKE_VARIABLES.items() if name.split("=")[0] == variable)


# target -> the make variables that carry a value (VAR=value -> --flag value) it must pass on.
VALUE_VARIABLES = {
    "demo": ["PROMPT", "OUT", "MODEL_DIR"],
    "serve": ["MODEL_DIR", "PORT"],
    "invoke": ["PROMPT", "OUT", "URL", "REGION", "JOB_TIMEOUT"],
    "preflight": ["INFRA", "REGION", "TFVARS", "IMAGE_URI"],
    "plan": ["INFRA", "REGION", "TFVARS", "IMAGE_URI", "BACKEND_CONFIG"],
    "apply": ["INFRA", "REGION", "TFVARS", "IMAGE_URI", "BACKEND_CONFIG"],
    "destroy": ["INFRA", "REGION", "TFVARS", "BACKEND_CONFIG"],
    "seed-models": ["MODEL", "NAME", "REVISION", "INFRA", "REGION"],
    "rollback": ["NAME", "REVISION", "INFRA", "REGION"],
    "push-image": ["IMAGE", "DOCKER", "INFRA"],
}
# target -> the VAR=1 switches it must pass on as flags (and not pass without).
SWITCHES = {
    "invoke": ["JSON=1", "JOB=1"],
    "preflight": ["JSON=1"],
    "plan": ["JSON=1", "MIGRATE_STATE=1", "ALLOW_FUNCTION_DELETE=1", "ALLOW_DATA_LOSS=1"],
    "apply": [
        "JSON=1",
        "MIGRATE_STATE=1",
        "ALLOW_FUNCTION_DELETE=1",
        "ALLOW_DATA_LOSS=1",
        "SWITCH_WEIGHTS_SOURCE=1",
    ],
    "destroy": ["JSON=1", "MIGRATE_STATE=1", "CONFIRM=1"],
    "seed-models": ["JSON=1", "BF16_COPY=1", "NOT_SERVED=1"],
    "rollback": ["JSON=1", "NOT_SERVED=1"],
}
# What a target needs to run at all (seed-models refuses to start without a source).
REQUIRED = {"seed-models": ["MODEL=acme/tiny-sd"], "rollback": ["REVISION=r0"]}


@pytest.mark.parametrize(
    ("target", "variable"), [(t, v) for t, names in VALUE_VARIABLES.items() for v in names], ids="-".join
)
def test_each_variable_reaches_its_flag(target: str, variable: str) -> None:
    value = "it's a value" if variable == "PROMPT" else f"x-{variable.lower()}"
    base = [a for a in REQUIRED.get(target, []) if not a.startswith(f"{variable}=")]
    words = dry_run(target, *base, f"{variable}={value}")
    assert flag_value(words, _flag_of(variable)) == value, words


@pytest.mark.parametrize(
    ("target", "switch"), [(t, s) for t, names in SWITCHES.items() for s in names], ids="-".join
)
def test_each_switch_is_passed_only_when_1(target: str, switch: str) -> None:
    flag = next(flag for flag, name in MAKE_VARIABLES.items() if name == switch)
    variable = switch.split("=")[0]
    required = REQUIRED.get(target, [])
    assert flag in dry_run(target, *required, switch)
    assert flag not in dry_run(target, *required)
    assert flag not in dry_run(target, *required, f"{variable}=0")


def test_demo_honours_prompt_and_out() -> None:
    words = dry_run("demo", "PROMPT=a red fox", "OUT=fox.png")
    assert flag_value(words, "--prompt") == "a red fox"
    assert flag_value(words, "--output") == "fox.png"
    bare = dry_run("demo")  # nothing given: the command's own defaults (the CLI's --help shows them)
    assert "--prompt" not in bare
    assert "--output" not in bare


def test_a_prompt_is_passed_exactly_as_typed() -> None:
    prompt = """a fox's "den" under $HOME; `no` substitution"""
    assert flag_value(dry_run("invoke", f"PROMPT={prompt}"), "--prompt") == prompt


def test_every_sd_lambda_run_from_make_carries_the_make_marker() -> None:
    for target in [*VALUE_VARIABLES, "build-image", "requirements"]:
        assert dry_run(target, *REQUIRED.get(target, []))[0] == f"{FROM_MAKE_ENV}=1", target


def test_the_old_names_are_gone() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "TF_ROOT" not in makefile
    assert "--infra-dir" not in makefile
    assert "--out " not in makefile


def test_apply_builds_and_pushes_unless_an_image_is_given() -> None:
    staged = dry_run("apply", "REGION=eu-west-1", "TFVARS=prod.tfvars")
    assert flag_value(staged, "--push-command") == "make --no-print-directory build-image push-image"
    assert flag_value(staged, "--var-file") == "prod.tfvars"
    pinned = dry_run("apply", f"IMAGE_URI={IMAGE_URI}")
    assert flag_value(pinned, "--image-uri") == IMAGE_URI
    assert "--push-command" not in pinned


def test_apply_passes_the_model_to_bake_to_the_build_and_to_the_check() -> None:
    """weights_source = "image": the build bakes MODEL_DIR/MODEL (NAME), and deploy checks one is given."""
    words = dry_run("apply", "MODEL_DIR=/models/my tiny", "NAME=tiny")
    push = shlex.split(flag_value(words, "--push-command") or "")
    assert push[-2:] == ["MODEL_DIR=/models/my tiny", "NAME=tiny"]
    assert flag_value(words, "--baked-model") == "/models/my tiny"
    hub = dry_run("apply", "MODEL=acme/tiny-sd@main")
    assert shlex.split(flag_value(hub, "--push-command") or "")[-1] == "MODEL=acme/tiny-sd@main"
    assert flag_value(hub, "--baked-model") == "acme/tiny-sd@main"
    # A given image is deployed as it is: nothing is built, so nothing is baked.
    assert "--baked-model" not in dry_run("apply", f"IMAGE_URI={IMAGE_URI}", "MODEL_DIR=/models/tiny")
    assert "--baked-model" not in dry_run("apply")


def test_rollback_goes_through_deploy_with_the_efs_arguments_after_the_separator() -> None:
    words = dry_run("rollback", "REVISION=r0", "NAME=tiny", "LORA_NAME=ink", "TFVARS=prod.tfvars")
    assert words[2:4] == ["deploy", "rollback"]
    separator = words.index("--")
    assert flag_value(words[:separator], "--revision") == "r0"
    assert flag_value(words[:separator], "--var-file") == "prod.tfvars"  # an image rollback applies them
    assert flag_value(words[separator:], "--name") == "tiny"
    assert flag_value(words[separator:], "--lora-name") == "ink"


def test_preflight_needs_docker_only_without_an_image() -> None:
    assert flag_value(dry_run("preflight", "DOCKER=podman"), "--docker") == "podman"
    assert "--docker" not in dry_run("preflight", f"IMAGE_URI={IMAGE_URI}")
    assert flag_value(dry_run("apply", "DOCKER=podman"), "--docker") == "podman"
    assert "--docker" not in dry_run("apply", f"IMAGE_URI={IMAGE_URI}")


def test_tfvars_may_name_several_files() -> None:
    words = dry_run("plan", "TFVARS=a.tfvars b.tfvars")
    assert [words[i + 1] for i, word in enumerate(words) if word == "--var-file"] == ["a.tfvars", "b.tfvars"]


def test_invoke_reads_the_url_from_infra_unless_url_is_given() -> None:
    assert flag_value(dry_run("invoke", "PROMPT=x", "INFRA=stacks/prod"), "--infra") == "stacks/prod"
    given = dry_run("invoke", "PROMPT=x", "URL=https://u.lambda-url.eu-west-1.on.aws/")
    assert "--infra" not in given


def _make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # -o: never (re)build the venv from a test; it is there, the suite runs in it.
    command = [
        "make",
        "--no-print-directory",
        "-s",
        "-o",
        ".venv/.stamp-install",
        "-o",
        ".venv/.stamp-ops",
        *args,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_errors_from_make_name_the_make_variable(tmp_path: Path) -> None:
    missing = _make("invoke", f"INFRA={tmp_path}")
    assert missing.returncode != 0
    assert 'sd-lambda generate: error: the prompt is empty: set PROMPT="a red fox"' in missing.stderr
    no_stack = _make("invoke", "PROMPT=a fox", f"INFRA={tmp_path / 'none'}")
    assert no_stack.returncode != 0
    assert "(or set URL=)" in no_stack.stderr
    no_release = _make("rollback", "SEED_ARGS=--bucket b --instance-id i-1")
    assert "sd-lambda rollback: error: no release to switch to: set REVISION=" in no_release.stderr


OPERATOR_TARGETS = (
    "build-image",
    "push-image",
    "invoke",
    "preflight",
    "plan",
    "apply",
    "destroy",
    "seed-models",
    "rollback",
)


@functools.cache
def make_database() -> list[str]:
    """The rules make reads from the Makefile (``make -p``), once for every test that asks."""
    result = subprocess.run(
        ["make", "-p", "-n", "--no-print-directory", "help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.splitlines()


@pytest.mark.parametrize("target", OPERATOR_TARGETS)
def test_operator_targets_need_only_the_ops_install(target: str) -> None:
    # An operator machine runs `make install-ops` (no torch); these targets must not pull the full install.
    rule = next(line for line in make_database() if line.startswith(f"{target}: "))
    prerequisites = rule.split(":", 1)[1].split()
    assert prerequisites == [".venv/.stamp-ops"]
