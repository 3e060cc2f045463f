"""weights_source in the operator flow: apply bakes a model only into an image stack's image, rollback
redeploys the previous image of an image stack, seeding refuses one (moto ECR/Lambda, a fake stack)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from sd_lambda.cli import main as cli_main
from sd_lambda.ops import deploy
from sd_lambda.ops.deploy import DeployOptions, StackValues, stack_values
from sd_lambda.ops.stack_outputs import StackError, WeightsInImageError, refuse_weights_in_image

from .test_deploy import (
    REGION,
    REPOSITORY_URL,
    FakeStack,
    _push_in_order,
    _tags_of,
    aws,  # noqa: F401 (fixture)
    create_function_in_moto,
)

pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")

INFRA = Path(__file__).parents[2] / "infra"


def _values(weights_source: str | None) -> StackValues:
    return StackValues(
        name="sd-lambda",
        region=REGION,
        reserved_concurrency=None,
        memory_size=None,
        ecr_keep_deployments=3,
        weights_source=weights_source,
    )


def _bake(*digests: str) -> None:
    """Tag images as push-image tags a baked one (sd_lambda.ops.container.baked.model_tag)."""
    from sd_lambda.ops.container.baked import model_tag
    from sd_lambda.ops.container.registry import add_tag

    ecr = boto3.client("ecr", region_name=REGION)
    for index, digest in enumerate(digests):
        add_tag(ecr, "sd-lambda", digest, model_tag(f"git-{index}", "test--tiny-sd@r1"))


################################################################################
# Which mode: the var files, else the deployed stack
################################################################################


def test_the_mode_comes_from_the_var_files_with_efs_by_default(tmp_path: Path) -> None:
    assert stack_values(DeployOptions(infra_dir=INFRA)).weights_source == "efs"
    tfvars = tmp_path / "baked.tfvars"
    tfvars.write_text('weights_source = "image"\n')
    assert stack_values(DeployOptions(infra_dir=INFRA, var_files=(tfvars,))).weights_source == "image"
    assert stack_values(DeployOptions(infra_dir=INFRA / "examples" / "baked")).weights_source == "image"


def test_a_stack_without_the_variable_takes_the_deployed_output() -> None:
    assert deploy.weights_source(_values(None), {"weights_source": "image"}) == "image"
    assert deploy.weights_source(_values(None), {}) == "efs"
    assert deploy.weights_source(_values("efs"), {"weights_source": "image"}) == "efs"  # the next apply's


################################################################################
# apply: the model to bake
################################################################################


def test_image_mode_without_a_model_to_bake_is_refused_before_anything_is_created() -> None:
    stack = FakeStack()

    with pytest.raises(StackError) as refused:
        deploy.apply(
            DeployOptions(push_command="make build-image push-image"), stack, values=_values("image")
        )

    assert "no model is given to bake: make apply MODEL_DIR=" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert stack.names == ["init"]  # no plan, no ECR repository, no push


def test_image_mode_refusal_also_reads_the_deployed_output() -> None:
    stack = FakeStack()
    stack.applied_outputs = {"weights_source": "image"}

    with pytest.raises(StackError, match="no model is given to bake"):
        deploy.apply(DeployOptions(push_command="make build-image push-image"), stack, values=_values(None))
    assert stack.names == ["init"]


def test_efs_mode_refuses_a_model_to_bake() -> None:
    stack = FakeStack()

    with pytest.raises(StackError, match=r'weights_source = "efs" serves the model from EFS'):
        deploy.apply(
            DeployOptions(push_command="make build-image push-image", baked_model="/models/tiny"),
            stack,
            values=_values("efs"),
        )
    assert stack.names == ["init"]


def test_image_mode_builds_with_the_model_then_deploys_the_pushed_digest(aws: None, tmp_path: Path) -> None:  # noqa: F811
    (digest,) = _push_in_order(1)
    _bake(digest)
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    record = tmp_path / "push.json"
    digest_file = tmp_path / ".image-digest"
    script = tmp_path / "push.py"
    # A stand-in for `make build-image push-image MODEL_DIR=...`: records its arguments, writes the digest.
    script.write_text(
        "import json, pathlib, sys\n"
        f"pathlib.Path({str(record)!r}).write_text(json.dumps(sys.argv[1:]))\n"
        f"pathlib.Path({str(digest_file)!r}).write_text({digest!r})\n"
    )
    options = DeployOptions(
        push_command=f"python3 {script} MODEL_DIR=/models/tiny",
        baked_model="/models/tiny",
        digest_file=digest_file,
        wait_seconds=10,
    )
    stack = FakeStack()

    deploy.apply(options, stack, values=_values("image"))

    assert json.loads(record.read_text()) == ["MODEL_DIR=/models/tiny"]
    assert stack.calls[-1][1] == {"variables": {"image_uri": f"{REPOSITORY_URL}@{digest}"}}


def test_image_mode_with_a_given_image_needs_no_model(aws: None) -> None:  # noqa: F811
    (digest,) = _push_in_order(1)
    _bake(digest)
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    stack = FakeStack()

    deploy.apply(
        DeployOptions(image_uri=f"{REPOSITORY_URL}@{digest}", wait_seconds=10), stack, values=_values("image")
    )

    assert stack.names == ["init", "plan", "apply_plan", "plan", "apply_plan"]


################################################################################
# rollback: the previous deployed image
################################################################################


def _deployed_history(count: int) -> list[str]:
    """``count`` images, each deployed in turn (deployed-* tags one day apart); the last one runs."""
    from sd_lambda.ops.container.registry import add_tag

    digests = _push_in_order(count)
    _bake(*digests)
    ecr = boto3.client("ecr", region_name=REGION)
    for index, digest in enumerate(digests):
        add_tag(ecr, "sd-lambda", digest, f"deployed-2026010{index + 1}T000000Z")
    create_function_in_moto(f"{REPOSITORY_URL}@{digests[-1]}")
    return digests


def _running(digest: str) -> FakeStack:
    stack = FakeStack()
    stack.applied_outputs = {"image_uri": f"{REPOSITORY_URL}@{digest}", "weights_source": "image"}
    return stack


def test_rollback_redeploys_the_image_deployed_before_the_running_one(aws: None) -> None:  # noqa: F811
    first, second, running = _deployed_history(3)
    stack = _running(running)

    deploy.rollback(DeployOptions(wait_seconds=10), stack, values=_values("image"))

    assert stack.names == ["init", "plan", "apply_plan"]  # one checked full apply, nothing targeted
    assert stack.calls[-1][1] == {"variables": {"image_uri": f"{REPOSITORY_URL}@{second}"}}
    assert len([tag for tag in _tags_of(second) if tag.startswith("deployed-")]) == 2  # marked again
    assert first != second


def test_rollback_to_a_given_digest(aws: None) -> None:  # noqa: F811
    first, _, running = _deployed_history(3)
    stack = _running(running)

    deploy.rollback(DeployOptions(wait_seconds=10), stack, digest=first, values=_values("image"))

    assert stack.calls[-1][1] == {"variables": {"image_uri": f"{REPOSITORY_URL}@{first}"}}


def test_rollback_without_an_earlier_deployed_image_is_one_line(aws: None) -> None:  # noqa: F811
    (running,) = _deployed_history(1)
    stack = _running(running)

    with pytest.raises(StackError, match=r"^no earlier deployed image to roll back to: .*sha256:\.\.\.$"):
        deploy.rollback(DeployOptions(wait_seconds=10), stack, values=_values("image"))
    assert stack.names == ["init"]


def test_rollback_of_a_stack_without_a_function_is_one_line() -> None:
    with pytest.raises(StackError, match="runs no function yet"):
        deploy.rollback(DeployOptions(), FakeStack(), values=_values("image"))


def test_rollback_refuses_a_malformed_digest(aws: None) -> None:  # noqa: F811
    (running,) = _deployed_history(1)

    with pytest.raises(StackError, match=r"is an image digest \(sha256:<64 hex>\)"):
        deploy.rollback(DeployOptions(), _running(running), digest="r0", values=_values("image"))


def test_previous_deployed_image_goes_by_the_latest_deployed_tag() -> None:
    images = [
        {
            "imageDigest": "sha256:a",
            "imageTags": ["git-1", "deployed-20260101T000000Z", "deployed-20260301T000000Z"],
        },
        {"imageDigest": "sha256:b", "imageTags": ["deployed-20260201T000000Z"]},
        {"imageDigest": "sha256:c", "imageTags": ["git-3"]},  # pushed, never deployed
        {"imageDigest": "sha256:d", "imageTags": ["deployed-20260401T000000Z"]},  # running
    ]
    assert deploy.previous_deployed_image(images, "sha256:d") == "sha256:a"


def test_cli_rollback_of_an_efs_stack_switches_the_release(monkeypatch: pytest.MonkeyPatch) -> None:
    forwarded: list[list[str]] = []
    import sd_lambda.cli

    real_main = sd_lambda.cli.main

    def recording(argv: list[str]) -> int:
        if argv[0] == "rollback":
            forwarded.append(argv)
            return 0
        return real_main(argv)

    monkeypatch.setattr(sd_lambda.cli, "main", recording)
    monkeypatch.setattr(deploy, "_stack", lambda options: FakeStack())  # no weights_source output: EFS

    code = real_main(
        ["deploy", "rollback", "--infra", str(INFRA), "--revision", "r0", "--", "--name", "tiny", "--json"]
    )

    assert code == 0
    assert forwarded == [["rollback", "--name", "tiny", "--json", "--revision", "r0"]]


def test_cli_rollback_of_an_image_stack_redeploys(
    aws: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from sd_lambda.ops.preflight import Findings  # noqa: F401 (the rollback runs no preflight)

    _, second, running = _deployed_history(3)
    stack = _running(running)
    monkeypatch.setattr(deploy, "_stack", lambda options: stack)
    var_file = tmp_path / "baked.tfvars"
    var_file.write_text('weights_source = "image"\n')

    code = cli_main(
        [
            "deploy",
            "rollback",
            "--infra",
            str(INFRA),
            "--var-file",
            str(var_file),
            "--revision",
            "",
            "--wait-seconds",
            "10",
            "--",
            "--name",
            "x",
        ]
    )

    assert code == 0
    assert stack.calls[-1][1] == {"variables": {"image_uri": f"{REPOSITORY_URL}@{second}"}}


################################################################################
# Seeding refuses a stack whose model is in the image
################################################################################


def test_the_refusal_names_the_rebuild() -> None:
    refuse_weights_in_image({"weights_source": "efs"})
    refuse_weights_in_image({})  # a stack applied before the output existed is an EFS stack
    with pytest.raises(WeightsInImageError, match=r"rebuild instead, make apply MODEL_DIR="):
        refuse_weights_in_image({"weights_source": "image"})


@pytest.mark.parametrize(
    "argv",
    [
        ["seed", "--model", "acme/tiny-sd"],
        ["seed-lora", "--lora", "acme/tiny-lora"],
        ["rollback", "--revision", "r0"],
    ],
    ids=["seed", "seed-lora", "rollback"],
)
def test_seeding_commands_refuse_an_image_stack_in_one_line(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sd_lambda.ops.stack_outputs

    outputs = {
        "weights_source": "image",
        "weights_bucket_name": "b",
        "seeder_instance_id": None,
        "region": REGION,
    }
    monkeypatch.setattr(sd_lambda.ops.stack_outputs, "read_outputs", lambda infra_dir: outputs)

    code = cli_main([*argv, "--infra", str(INFRA)])

    assert code != 0
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert 'weights_source = "image"' in error
    assert "make apply MODEL_DIR=" in error
    assert "Traceback" not in error


################################################################################
# Never by accident: a mode switch, a model-less image on an image stack
################################################################################


def test_apply_refuses_var_files_that_would_switch_a_running_stack(aws: None) -> None:  # noqa: F811
    """An image stack applied without its TFVARS would become an EFS stack with an empty mount."""
    (digest,) = _push_in_order(1)
    _bake(digest)
    stack = _running(digest)
    options = DeployOptions(image_uri=f"{REPOSITORY_URL}@{digest}", wait_seconds=10)
    with pytest.raises(StackError, match=r'runs weights_source = "image" but these var files say "efs"'):
        deploy.apply(options, stack, values=_values("efs"))
    assert stack.names == ["init"]


def test_apply_switches_a_running_stack_when_asked(aws: None) -> None:  # noqa: F811
    (digest,) = _push_in_order(1)
    create_function_in_moto(f"{REPOSITORY_URL}@{digest}")
    stack = _running(digest)
    options = DeployOptions(
        image_uri=f"{REPOSITORY_URL}@{digest}", wait_seconds=10, switch_weights_source=True
    )
    deploy.apply(options, stack, values=_values("efs"))  # image -> efs: a model-less image is fine there
    assert stack.calls[-1][1] == {"variables": {"image_uri": f"{REPOSITORY_URL}@{digest}"}}


def test_rollback_never_switches_the_mode(aws: None) -> None:  # noqa: F811
    _, _, running = _deployed_history(3)
    stack = _running(running)
    with pytest.raises(StackError, match=r"pass the var files that set it \(docs/weights-in-image\.md\)$"):
        deploy.rollback(DeployOptions(wait_seconds=10), stack, values=_values("efs"))
    assert stack.names == ["init"]


def test_an_image_stack_never_deploys_a_model_less_image(aws: None) -> None:  # noqa: F811
    model_less, baked, running = _push_in_order(3)
    from sd_lambda.ops.container.registry import add_tag

    ecr = boto3.client("ecr", region_name=REGION)
    _bake(baked, running)
    for index, digest in enumerate((model_less, baked, running)):
        add_tag(ecr, "sd-lambda", digest, f"deployed-2026020{index + 1}T000000Z")
    create_function_in_moto(f"{REPOSITORY_URL}@{running}")
    stack = _running(running)

    # The newest earlier deployment holds a model, the one before that (from the EFS days) none.
    deploy.rollback(DeployOptions(wait_seconds=10), stack, values=_values("image"))
    assert stack.calls[-1][1] == {"variables": {"image_uri": f"{REPOSITORY_URL}@{baked}"}}
    with pytest.raises(StackError, match=f"image {model_less} has no model baked in"):
        deploy.rollback(
            DeployOptions(wait_seconds=10), _running(running), digest=model_less, values=_values("image")
        )
    with pytest.raises(StackError, match="has no model baked in"):
        deploy.apply(
            DeployOptions(image_uri=f"{REPOSITORY_URL}@{model_less}", wait_seconds=10),
            _running(running),
            values=_values("image"),
        )


def test_a_corrupt_model_to_bake_stops_before_the_repository_is_created(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from helpers import seed_release

    paths = seed_release(tmp_path / "efs", "m", "r1", tiny_model_dir)
    config = paths.resolve_current() / "unet" / "config.json"
    config.write_text(config.read_text() + " ")
    stack = FakeStack()
    options = DeployOptions(push_command="make build-image push-image", baked_model=str(paths.model_dir))
    with pytest.raises(StackError, match=r"^the model to bake: manifest mismatch .*unet/config\.json"):
        deploy.apply(options, stack, values=_values("image"))
    assert stack.names == ["init"]
