"""Deploy the stack: ``sd-lambda deploy plan|apply|destroy`` (``make plan/apply/destroy``).

The function needs an image pinned by digest, and the image needs the ECR repository the stack creates.
``apply`` first runs the preflight (``sd-lambda deploy preflight``: credentials, terraform, docker, the
account's Lambda limits), then breaks that loop in stages: a targeted plan + apply of the repository, then
the image (``--image-uri`` or the digest ``make push-image`` leaves in ``.image-digest``, checked to be a
manifest Lambda runs), then the full apply with ``image_uri = <repo>@sha256:<digest>``, then a
``deployed-<UTC time>`` tag on that digest (the ECR lifecycle keeps the image the function runs), then a
wait until Lambda reports the function Active.

With ``weights_source = "image"`` the model is baked into that image: ``apply`` refuses, before anything
is created, to build one without ``--baked-model`` (``MODEL_DIR=``/``MODEL=``), and an EFS stack's build
with one. ``rollback`` redeploys the image deployed before the running one (its ``deployed-*`` tags) in
an image stack, and hands an EFS stack's release rollback to ``sd-lambda rollback``.

Without a new image, ``plan`` and ``apply`` keep the one the function runs (the ``image_uri`` output).
Every plan is saved, checked and only then applied: one that would delete or replace the live function
(which also changes its URL) is refused unless ``--allow-function-delete`` is given, and one that would
delete or replace data (EFS, its access point, the weights bucket, the KMS key, the ECR repository)
unless ``--allow-data-loss`` is given. With ``--json`` each action prints one JSON document on stdout
(apply: the stack's outputs; plan: the image and the planned changes) and everything else on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sd_lambda.cli import CommandError, add_json_flag, ask_for, option, report
from sd_lambda.ops.container.manifest import lambda_manifest_problem
from sd_lambda.ops.plan_guard import data_loss, data_loss_message, function_removal
from sd_lambda.ops.preflight import PreflightInputs, memory_cap_advice, run_preflight
from sd_lambda.ops.stack_outputs import (
    DEFAULT_INFRA_DIR,
    WEIGHTS_IN_IMAGE,
    WEIGHTS_ON_EFS,
    StackError,
    StackTerraform,
    TerraformCommandError,
)

# What the targeted first stage creates; everything else needs the image.
REGISTRY_TARGETS: tuple[str, ...] = (
    "module.lambda.aws_ecr_repository.this",
    "module.lambda.aws_ecr_lifecycle_policy.this",
    "module.lambda.aws_ecr_repository_policy.this",
)
# The live function: a plan that deletes (or replaces) it needs --allow-function-delete.
FUNCTION_ADDRESS = "module.lambda.aws_lambda_function.this[0]"
DEFAULT_DIGEST_FILE = Path(".image-digest")
WAIT_POLL_SECONDS = 5
DEFAULT_WAIT_SECONDS = 900

# Lambda's refusal of MemorySize above the account's memory quota, as the AWS provider reports it, e.g.
# "InvalidParameterValueException: 'MemorySize' value failed to satisfy constraint: Member must have value
# less than or equal to 3008" (older providers: ValidationException).
_MEMORY_REFUSAL = re.compile(
    r"MemorySize'? value failed to satisfy constraint"
    r"|(InvalidParameterValue|Validation)Exception.{0,300}MemorySize"
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PINNED_IMAGE = re.compile(
    r"^(?P<registry>[0-9]{12}\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?)"
    r"/(?P<repository>[a-z0-9][a-z0-9._/-]*)@(?P<digest>sha256:[0-9a-f]{64})\Z"
)


class Stack(Protocol):
    """What the driver needs from Terraform (:class:`~sd_lambda.ops.stack_outputs.StackTerraform`)."""

    def init(self, backend_config: Path | None = None, migrate_state: bool = False) -> None: ...
    def plan(
        self,
        variables: Mapping[str, Any],
        var_files: Sequence[Path] = (),
        out: Path | None = None,
        targets: Sequence[str] = (),
    ) -> None: ...
    def show_plan(self, plan_file: Path) -> dict[str, Any]: ...
    def apply_plan(self, plan_file: Path) -> None: ...
    def destroy(self, variables: Mapping[str, Any], var_files: Sequence[Path] = ()) -> None: ...
    def outputs(self) -> dict[str, Any]: ...


ClientFactory = Callable[[str, str], Any]  # (service, region) -> boto3 client


def boto3_client(service: str, region: str) -> Any:
    import boto3

    return boto3.client(service, region_name=region)


@dataclass(frozen=True)
class DeployOptions:
    infra_dir: Path = DEFAULT_INFRA_DIR
    region: str | None = None
    image_uri: str | None = None
    digest_file: Path = DEFAULT_DIGEST_FILE
    push_command: str | None = None
    # What the push command bakes into the image (MODEL_DIR or MODEL), for weights_source = "image".
    baked_model: str | None = None
    backend_config: Path | None = None
    var_files: tuple[Path, ...] = ()
    variables: dict[str, str] = field(default_factory=dict)
    registry_targets: tuple[str, ...] = REGISTRY_TARGETS
    function_address: str = FUNCTION_ADDRESS
    allow_function_delete: bool = False
    allow_data_loss: bool = False
    # Let apply change weights_source of a running stack (the var files say other than its output).
    switch_weights_source: bool = False
    migrate_state: bool = False
    wait_seconds: int = DEFAULT_WAIT_SECONDS

    @property
    def terraform_variables(self) -> dict[str, Any]:
        variables: dict[str, Any] = dict(self.variables)
        if self.region:
            variables["region"] = self.region
        return variables

    @property
    def terraform_env(self) -> dict[str, str]:
        # The stack has no provider block: the aws provider takes its region from the environment.
        return {"AWS_REGION": self.region} if self.region else {}


@dataclass(frozen=True)
class PinnedImage:
    uri: str
    region: str
    repository: str
    digest: str


def parse_pinned_image(image_uri: str) -> PinnedImage:
    """An ECR image URI pinned by digest, or a clear error (tags such as ``:latest`` are refused)."""
    match = _PINNED_IMAGE.match(image_uri.strip())
    if match is None:
        raise StackError(
            f"image URI {image_uri!r} is not an ECR image pinned by digest "
            "(<account>.dkr.ecr.<region>.amazonaws.com/<repo>@sha256:<64 hex>); tags like :latest are refused"
        )
    return PinnedImage(match.group(0), match["region"], match["repository"], match["digest"])


def read_digest(digest_file: Path) -> str:
    """The ``sha256:<hex>`` digest in ``digest_file`` (``sha256:...``, ``repo@sha256:...`` or bare hex)."""
    try:
        text = Path(digest_file).read_text().strip()
    except FileNotFoundError:
        raise StackError(
            f"no image digest: {digest_file} does not exist. Build and push the image (`make push-image`), "
            f"or {ask_for('--image-uri', '<ecr_repository_url>@sha256:<digest>')}"
        ) from None
    if re.fullmatch(r"[0-9a-f]{64}", text):
        return f"sha256:{text}"
    match = _DIGEST.search(text)
    if match is None:
        raise StackError(f"{digest_file} holds no sha256:<64 hex> image digest (found {text[:80]!r})")
    return match.group(0)


def check_image_region(image: PinnedImage, stack_region: str | None) -> None:
    """Lambda pulls images only from ECR in the function's own region."""
    if stack_region and image.region != stack_region:
        raise StackError(
            f"image {image.uri} is in region {image.region} but the stack deploys to {stack_region}: "
            "Lambda only runs images from ECR in its own region; push it to the stack's ecr_repository_url"
        )


def refuse_function_deletion(plan_document: Mapping[str, Any], options: DeployOptions) -> None:
    """A clear error when the saved plan deletes or replaces the live function, unless allowed."""
    if options.allow_function_delete:
        return
    verb = function_removal(plan_document, options.function_address)
    if verb is not None:
        raise StackError(
            f"refusing to {verb} the live function ({options.function_address}); its function URL "
            f"would change. Pass an image ({option('--image-uri')}, or push one), or allow it with "
            f"{option('--allow-function-delete')}"
        )


def refuse_data_loss(plan_document: Mapping[str, Any], options: DeployOptions) -> None:
    """A clear error when the saved plan deletes or replaces stored data, unless allowed."""
    losses = data_loss(plan_document)
    if losses and not options.allow_data_loss:
        raise StackError(data_loss_message(losses))


def repository_images(ecr: Any, image: PinnedImage) -> list[dict[str, Any]]:
    """The image's repository as one DescribeImages listing, which both checks before the full apply read."""
    from sd_lambda.ops.container.registry import PushError
    from sd_lambda.ops.container.registry import repository_images as listing

    try:
        return listing(ecr, image.repository)
    except PushError as exc:
        raise StackError(f"{exc} (in {image.region})") from None


def verify_image(images: Sequence[Mapping[str, Any]], image: PinnedImage) -> None:
    """Fail before the full apply, with the repository named, when the digest is not in the registry's
    listing ``images`` or is stored as a manifest Lambda refuses at CreateFunction (an image index)."""
    detail = next((entry for entry in images if entry.get("imageDigest") == image.digest), None)
    if detail is None:
        raise StackError(
            f"image {image.digest} is not in ECR repository {image.repository}: "
            "push it first (`make push-image`)"
        )
    problem = lambda_manifest_problem(image.uri, detail.get("imageManifestMediaType"))
    if problem is not None:
        raise StackError(problem)


def refuse_an_image_the_lifecycle_would_expire(
    images: list[dict[str, Any]], image: PinnedImage, keep: int | None
) -> None:
    """Before the full apply: a rollback to an image pushed before ``keep`` (``ecr_keep_deployments``)
    newer deployed ones would be expired by the lifecycle's first rule (it ranks by push time), so refuse
    it."""
    from sd_lambda.ops.container.registry import PushError, deployed_images_pushed_after

    if keep is None:
        return
    try:
        newer = deployed_images_pushed_after(images, image.digest)
    except PushError as exc:
        raise StackError(f"{image.repository}: {exc}") from None
    if newer >= keep:
        raise StackError(
            f"image {image.digest} was pushed before {newer} newer deployed images and the ECR lifecycle "
            f"keeps the newest {keep} by push time, so it would expire while the function runs it: set "
            f"ecr_keep_deployments = {newer + 1} ({option('--var-file')}... "
            f"or --var ecr_keep_deployments={newer + 1})"
        )


def mark_deployed(ecr: Any, image: PinnedImage) -> str:
    """Tag the digest the function now runs ``deployed-<UTC time>``; returns the tag.

    The ECR lifecycle's first rule keeps the last ``repository_keep_deployments`` of these, and no
    lower-priority rule (git-* or untagged) can expire an image a higher one matched: the running image
    survives any number of later pushes. Tagged only after the apply succeeded, so a failed apply never
    protects an image nothing runs.
    https://docs.aws.amazon.com/AmazonECR/latest/userguide/LifecyclePolicies.html
    """
    from sd_lambda.ops.container.registry import PushError, add_tag, deployed_tag

    tag = deployed_tag()
    try:
        add_tag(ecr, image.repository, image.digest, tag)
    except PushError as exc:
        raise StackError(f"the function runs {image.uri}, but {exc}") from None
    print(f"==> tagged the deployed image {tag}", flush=True)
    return tag


def wait_until_ready(lambda_client: Any, function_name: str, timeout_seconds: int) -> dict[str, Any]:
    """Block until the function is Active and its last update finished (bounded by ``timeout_seconds``)."""
    from botocore.exceptions import WaiterError

    attempts = max(1, -(-timeout_seconds // WAIT_POLL_SECONDS))
    config = {"Delay": WAIT_POLL_SECONDS, "MaxAttempts": attempts}
    try:
        lambda_client.get_waiter("function_active_v2").wait(FunctionName=function_name, WaiterConfig=config)
        lambda_client.get_waiter("function_updated_v2").wait(FunctionName=function_name, WaiterConfig=config)
    except WaiterError as exc:
        state = (exc.last_response or {}).get("Configuration", {})
        reason = state.get("StateReason") or state.get("LastUpdateStatusReason") or str(exc)
        raise StackError(
            f"function {function_name} did not become ready (State={state.get('State')}, "
            f"LastUpdateStatus={state.get('LastUpdateStatus')}): {reason}"
        ) from None
    return lambda_client.get_function_configuration(FunctionName=function_name)


def run_push_command(command: str, repository_url: str) -> None:
    """Run the image build + push (``make push-image``) once the repository exists."""
    # Both names: ECR_REPOSITORY_URL for any script, REPOSITORY_URL for `make push-image`.
    environment = {**os.environ, "ECR_REPOSITORY_URL": repository_url, "REPOSITORY_URL": repository_url}
    print(f"==> pushing the image to {repository_url}: {command}", flush=True)
    try:
        completed = subprocess.run(shlex.split(command), env=environment, check=False)
    except FileNotFoundError as exc:
        raise StackError(f"push command {command!r} could not start: {exc.strerror}") from None
    if completed.returncode != 0:
        raise StackError(f"push command {command!r} failed (exit {completed.returncode})")


def _repository_url(stack: Stack) -> str | None:
    return stack.outputs().get("ecr_repository_url")


def _image_from_digest(repository_url: str | None, options: DeployOptions) -> str | None:
    """``<repo>@<digest>`` when both the repository and a digest file exist, else None."""
    if repository_url is None or not Path(options.digest_file).is_file():
        return None
    return f"{repository_url}@{read_digest(options.digest_file)}"


def _stack_region(options: DeployOptions, outputs: Mapping[str, Any]) -> str | None:
    return options.region or outputs.get("region")


def _plan_checked(
    stack: Stack,
    variables: Mapping[str, Any],
    options: DeployOptions,
    plan_file: Path,
    targets: Sequence[str] = (),
) -> dict[str, Any]:
    """Save the plan to ``plan_file`` and refuse it if it deletes the live function or stored data;
    returns the plan (``terraform show -json``)."""
    stack.plan(variables, options.var_files, out=plan_file, targets=targets)
    document = stack.show_plan(plan_file)
    refuse_data_loss(document, options)
    refuse_function_deletion(document, options)
    return document


def planned_changes(plan_document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The plan's resource changes that do something: ``[{"address", "actions"}]``."""
    return [
        {"address": change.get("address"), "actions": change.get("change", {}).get("actions", [])}
        for change in plan_document.get("resource_changes", [])
        if change.get("change", {}).get("actions", ["no-op"]) not in (["no-op"], ["read"])
    ]


def _apply_checked(
    stack: Stack,
    variables: Mapping[str, Any],
    options: DeployOptions,
    values: StackValues,
    targets: Sequence[str] = (),
) -> None:
    """plan -out -> show -json -> refuse what must not happen -> apply exactly that saved plan."""
    with tempfile.TemporaryDirectory(prefix="sd-lambda-plan-") as scratch:
        plan_file = Path(scratch) / "stack.tfplan"
        _plan_checked(stack, variables, options, plan_file, targets)
        try:
            stack.apply_plan(plan_file)
        except TerraformCommandError as exc:
            if _MEMORY_REFUSAL.search(" ".join(exc.output.replace("│", " ").split())):
                raise StackError(
                    f"Lambda refused the function's memory: {memory_cap_advice(values.memory_size)}"
                ) from exc
            raise


# The variables the driver reads before Terraform runs: the preflight's and the lifecycle check's.
STACK_VARIABLES = (
    "name",
    "region",
    "reserved_concurrency",
    "memory_size",
    "ecr_keep_deployments",
    "environment_variables",
    "weights_source",
)


@dataclass(frozen=True)
class StackValues:
    """The effective values of :data:`STACK_VARIABLES` for this deploy's var files and ``--var``s."""

    name: str
    region: str | None
    reserved_concurrency: int | None
    memory_size: int | None
    ecr_keep_deployments: int | None
    environment_variables: dict[str, str] = field(default_factory=dict)
    # None: the stack declares no weights_source variable (an example wrapping the module); the deployed
    # stack's output then tells.
    weights_source: str | None = None


def _whole(name: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StackError(f"{name} must be a whole number or null, got {value!r}") from None


def _string_map(name: str, value: Any) -> dict[str, str]:
    """A ``map(string)`` variable's value as Terraform passes it on (numbers and bools become strings)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or any(isinstance(item, (Mapping, list)) for item in value.values()):
        raise StackError(f"{name} must be a map of strings, got {value!r}")
    return {
        str(key): str(item).lower() if isinstance(item, bool) else str(item) for key, item in value.items()
    }


def stack_values(options: DeployOptions) -> StackValues:
    """Read the var files once, before anything is created; a file that cannot be read is one line."""
    from sd_lambda.ops.tfvars import VariablesError, effective_values, expression

    try:
        values = effective_values(options.infra_dir, STACK_VARIABLES, options.var_files, options.variables)
        environment = values["environment_variables"]
        if isinstance(environment, str):  # from --var or TF_VAR_: an HCL expression
            environment = expression("environment_variables", environment)
    except VariablesError as exc:
        raise StackError(str(exc)) from None
    except OSError as exc:  # e.g. an unreadable infra/*.tf: still one line, naming the file
        raise StackError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return StackValues(
        name=str(values["name"]),
        region=values["region"],
        reserved_concurrency=_whole("reserved_concurrency", values["reserved_concurrency"]),
        memory_size=_whole("memory_size", values["memory_size"]),
        ecr_keep_deployments=_whole("ecr_keep_deployments", values["ecr_keep_deployments"]),
        environment_variables=_string_map("environment_variables", environment),
        weights_source=None if values["weights_source"] is None else str(values["weights_source"]),
    )


def check_model_source(weights_source: str, options: DeployOptions) -> None:
    """Before anything is created: an image stack's build must bake a model, an EFS stack's must not.

    With weights_source = "image" the function has no other copy of the model, so building an image
    without one would deploy a function that fails every request; with "efs" the stack sets MODEL_ROOT to
    the mount and a baked model would be dead weight in every cold start's image.
    """
    builds_image = options.image_uri is None and options.push_command is not None
    if weights_source == WEIGHTS_IN_IMAGE and builds_image and not options.baked_model:
        raise StackError(
            'weights_source = "image" serves the model baked into the function image, and no model is '
            "given to bake: make apply MODEL_DIR=<diffusers or release folder> or MODEL=owner/name@rev "
            "(or IMAGE_URI=<repo>@sha256:<digest> of an image that has one)"
        )
    if weights_source == WEIGHTS_ON_EFS and options.baked_model:
        raise StackError(
            'weights_source = "efs" serves the model from EFS (make seed-models), so MODEL_DIR/MODEL would '
            'only bloat the image: drop them, or set weights_source = "image" to bake the model in'
        )
    if weights_source == WEIGHTS_IN_IMAGE and builds_image and options.baked_model:
        check_model_dir(Path(options.baked_model).expanduser())


def check_model_dir(folder: Path) -> None:
    """A local folder to bake is read and verified as build-image will (sd_lambda.ops.container.baked),
    before stage 1 creates the repository: a corrupt or oversize model stops here, not after."""
    if not folder.exists():
        return  # a hub id (MODEL=): build-image downloads and checks it
    from sd_lambda.ops.container import baked

    try:
        baked.check_fits(0, baked.release_from_dir(folder))
    except baked.BakeError as exc:
        raise StackError(f"the model to bake: {exc}") from None


def check_weights_switch(values: StackValues, deployed: Mapping[str, Any], *, allowed: bool | None) -> None:
    """Refuse, before anything runs, a plan that would move a running stack's model elsewhere by accident.

    The var files decide weights_source, and the module's default ("efs") applies when none sets it: an
    ``apply`` or ``rollback`` of an image stack without its TFVARS would build the EFS stack and point the
    function at an empty mount (and the other way round), so every request would fail. ``allowed``: the
    operator asked for the switch (apply); None: no switch is ever right here (rollback)."""
    running, planned = deployed.get("weights_source"), values.weights_source
    # planned None: a root without the variable (an older module), which takes the deployed value.
    if not running or planned is None or planned == running or allowed:
        return
    switch = "" if allowed is None else f", or {option('--switch-weights-source')} to switch the stack"
    raise StackError(
        f'the stack runs weights_source = "{running}" but these var files say "{planned}" (the module '
        f"default when none sets it: {option('--var-file')} missing?): pass the var files that set "
        f"it{switch} (docs/weights-in-image.md)"
    )


def weights_source(values: StackValues, deployed: Mapping[str, Any]) -> str:
    """The mode the next apply deploys: the var files' value, else the deployed stack's, else EFS."""
    return values.weights_source or deployed.get("weights_source") or WEIGHTS_ON_EFS


def apply(
    options: DeployOptions,
    stack: Stack,
    clients: ClientFactory = boto3_client,
    values: StackValues | None = None,
) -> dict[str, Any]:
    """Registry first, then the image, then everything, then wait until Active. Returns the outputs.

    ``values``: the var files as the preflight read them; read here when not given, before Terraform runs.
    """
    values = stack_values(options) if values is None else values
    variables = options.terraform_variables
    stack.init(options.backend_config, migrate_state=options.migrate_state)
    deployed = stack.outputs()  # before the targeted apply, which may leave unrelated outputs stale
    check_weights_switch(values, deployed, allowed=options.switch_weights_source)
    mode = weights_source(values, deployed)
    check_model_source(mode, options)

    print("==> stage 1/3: the ECR repository (targeted plan, checked, applied)", flush=True)
    _apply_checked(stack, variables, options, values, targets=options.registry_targets)
    repository_url = _repository_url(stack)
    if repository_url is None:
        raise StackError("the targeted apply left no ecr_repository_url output")

    image_uri = options.image_uri
    if image_uri is None and options.push_command:
        run_push_command(options.push_command, repository_url)
        image_uri = f"{repository_url}@{read_digest(options.digest_file)}"
    if image_uri is None:
        image_uri = _image_from_digest(repository_url, options) or deployed.get("image_uri")
    if image_uri is None:
        read_digest(options.digest_file)  # raises: how to get an image
    image = parse_pinned_image(str(image_uri))
    check_image_region(image, _stack_region(options, deployed))
    ecr = clients("ecr", image.region)
    images = repository_images(ecr, image)
    verify_image(images, image)
    if mode == WEIGHTS_IN_IMAGE:
        refuse_a_model_less_image(images, image)
    refuse_an_image_the_lifecycle_would_expire(images, image, values.ecr_keep_deployments)
    return _deploy_image(stack, options, values, clients, ecr, image)


def refuse_a_model_less_image(images: Sequence[Mapping[str, Any]], image: PinnedImage) -> None:
    """An image stack's function has no other copy of the model: its image must be a baked one (push-image
    tags those ``...-baked-<name>-<revision>``, sd_lambda.ops.container.baked)."""
    from sd_lambda.ops.container.baked import is_baked_tag

    tags = next(
        (entry.get("imageTags") or [] for entry in images if entry.get("imageDigest") == image.digest), []
    )
    if not any(is_baked_tag(tag) for tag in tags):
        raise StackError(
            f"image {image.digest} has no model baked in (tags: {', '.join(tags) or 'none'}), and with "
            'weights_source = "image" the function has no other: deploy an image built with MODEL_DIR= or '
            "MODEL= (make apply MODEL_DIR=...)"
        )


def _deploy_image(
    stack: Stack,
    options: DeployOptions,
    values: StackValues,
    clients: ClientFactory,
    ecr: Any,
    image: PinnedImage,
    stages: tuple[str, str] = ("2/3", "3/3"),
) -> dict[str, Any]:
    """The full apply with ``image`` (checked beforehand), its deployed-* tag, the wait until Active."""
    print(f"==> stage {stages[0]}: the full stack with image_uri={image.uri}", flush=True)
    _apply_checked(stack, {**options.terraform_variables, "image_uri": image.uri}, options, values)
    mark_deployed(ecr, image)
    outputs = stack.outputs()
    function_name = outputs.get("function_name")
    if not function_name:
        raise StackError("the apply left no function_name output")

    region = outputs.get("region") or image.region
    print(f"==> stage {stages[1]}: waiting for {function_name} to be Active", flush=True)
    wait_until_ready(clients("lambda", region), function_name, options.wait_seconds)
    print(f"==> ready: {outputs.get('function_url')}", flush=True)
    return outputs


def previous_deployed_image(
    images: Sequence[Mapping[str, Any]], running_digest: str, *, baked_only: bool = False
) -> str:
    """The digest deployed before ``running_digest``: of the other images carrying a ``deployed-<UTC
    time>`` tag (the ECR lifecycle keeps the last ``ecr_keep_deployments`` of them), the one whose latest
    such tag is newest. The tags' fixed-width UTC times sort as text. ``baked_only``: only images with a
    model baked in (an image stack's images from before a switch from EFS have none)."""
    from sd_lambda.ops.container.baked import is_baked_tag
    from sd_lambda.ops.container.registry import DEPLOYED_TAG_PREFIX

    last_deployed = {
        str(entry["imageDigest"]): max(tags)
        for entry in images
        if entry.get("imageDigest") != running_digest
        and (tags := [tag for tag in entry.get("imageTags") or [] if tag.startswith(DEPLOYED_TAG_PREFIX)])
        and (not baked_only or any(is_baked_tag(tag) for tag in entry.get("imageTags") or []))
    }
    if not last_deployed:
        raise StackError(
            "no earlier deployed image to roll back to: the repository holds no other deployed-* image "
            f"(the ECR lifecycle keeps the last ecr_keep_deployments); pass {option('--revision')} sha256:..."
        )
    return max(last_deployed, key=lambda digest: last_deployed[digest])


def rollback(
    options: DeployOptions,
    stack: Stack,
    digest: str | None = None,
    clients: ClientFactory = boto3_client,
    values: StackValues | None = None,
) -> dict[str, Any]:
    """Redeploy an earlier image: ``digest``, or the one deployed before the running one.

    For weights_source = "image" this is the model's rollback too (the release lives in the image). The
    same checked plan and apply as :func:`apply`, with the stack's var files: only image_uri changes.
    """
    values = stack_values(options) if values is None else values
    stack.init(options.backend_config, migrate_state=options.migrate_state)
    deployed = stack.outputs()
    check_weights_switch(values, deployed, allowed=None)  # a rollback never moves the model
    running = deployed.get("image_uri")
    in_image = weights_source(values, deployed) == WEIGHTS_IN_IMAGE
    if not running:
        raise StackError("the stack runs no function yet (no image_uri output): nothing to roll back")
    current = parse_pinned_image(str(running))
    ecr = clients("ecr", current.region)
    images = repository_images(ecr, current)
    if digest is None:
        target = previous_deployed_image(images, current.digest, baked_only=in_image)
    else:
        match = _DIGEST.fullmatch(digest.strip())
        if match is None:
            raise StackError(
                f"{option('--revision')} of an image stack is an image digest (sha256:<64 hex>), "
                f"got {digest!r}"
            )
        target = match.group(0)
    if target == current.digest:
        raise StackError(f"the function already runs {target}")
    registry = current.uri.split("@", 1)[0]
    image = parse_pinned_image(f"{registry}@{target}")
    verify_image(images, image)
    if in_image:
        refuse_a_model_less_image(images, image)
    refuse_an_image_the_lifecycle_would_expire(images, image, values.ecr_keep_deployments)
    print(f"==> rolling back from {current.digest} to {image.digest}", flush=True)
    return _deploy_image(stack, options, values, clients, ecr, image, stages=("1/2", "2/2"))


def deployed_weights_source(options: DeployOptions, stack: Stack) -> str:
    """Where the deployed stack's model lives (its weights_source output); before any apply, or for a
    stack applied before that output existed, the var files' value, else "efs"."""
    try:
        deployed = stack.outputs()
    except StackError:
        deployed = {}
    if deployed.get("weights_source"):
        return str(deployed["weights_source"])
    return stack_values(options).weights_source or WEIGHTS_ON_EFS


@dataclass(frozen=True)
class PlanSummary:
    image_uri: str | None
    changes: list[dict[str, Any]]


def plan(options: DeployOptions, stack: Stack) -> PlanSummary:
    """Plan with the image that ``apply`` would deploy (IMAGE_URI, the pushed digest, or the deployed one).

    Without any image it plans everything but the function, and refuses if that deletes a live one.
    """
    stack.init(options.backend_config, migrate_state=options.migrate_state)
    deployed = stack.outputs()
    image_uri = (
        options.image_uri
        or _image_from_digest(deployed.get("ecr_repository_url"), options)
        or deployed.get("image_uri")
    )
    variables = options.terraform_variables
    if image_uri is not None:
        image = parse_pinned_image(image_uri)
        check_image_region(image, _stack_region(options, deployed))
        variables["image_uri"] = image.uri
    else:
        print(
            "==> no image yet (no IMAGE_URI, no repository + .image-digest, none deployed): "
            "planning without the function",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="sd-lambda-plan-") as scratch:
        document = _plan_checked(stack, variables, options, Path(scratch) / "stack.tfplan")
    return PlanSummary(image_uri, planned_changes(document))


def destroy(
    options: DeployOptions, stack: Stack, confirmed: bool, ask: Callable[[str], str] | None = None
) -> None:
    """``terraform destroy`` after an explicit confirmation (or ``confirmed``, i.e. CONFIRM=1).

    ``ask`` prompts for the answer; by default the terminal, and no terminal means no confirmation.
    """
    if not confirmed:
        if ask is None:
            if not sys.stdin.isatty():
                raise StackError(f"refusing to destroy without confirmation: rerun with {option('--yes')}")
            ask = input
        answer = ask(
            f"Destroy every resource of the stack in {options.infra_dir}? Type 'destroy' to confirm: "
        )
        if answer.strip() != "destroy":
            raise StackError("destroy cancelled")
    stack.init(options.backend_config, migrate_state=options.migrate_state)
    print(
        "==> destroying; Lambda can take 20-60 minutes to release the function's network interfaces",
        flush=True,
    )
    stack.destroy(options.terraform_variables, options.var_files)


################################################################################
# Preflight: before anything is created
################################################################################


def docker_cli(binary: str) -> Any:
    """The docker runner the preflight asks (tests replace this function)."""
    from sd_lambda.ops.container.docker import DockerCLI

    return DockerCLI(binary, stream=False)


def _default_region() -> str | None:
    import boto3

    return boto3.session.Session().region_name  # AWS_REGION / AWS_DEFAULT_REGION / the profile's region


def preflight_inputs(options: DeployOptions, values: StackValues) -> PreflightInputs:
    """The stack's effective name, region, reservation and memory for this deploy's flags."""
    return PreflightInputs(
        region=options.region or values.region or _default_region(),
        function_name=values.name,
        reserved_concurrency=values.reserved_concurrency,
        memory_size=values.memory_size,
        environment=values.environment_variables,
    )


def preflight(
    options: DeployOptions,
    build_image: bool,
    docker_binary: str = "docker",
    values: StackValues | None = None,
) -> None:
    """Run every check, print one line per finding, and raise if any problem would stop the deploy."""
    if not Path(options.infra_dir).is_dir():
        raise StackError(f"stack directory {options.infra_dir} does not exist")
    inputs = preflight_inputs(options, stack_values(options) if values is None else values)
    findings = run_preflight(inputs, boto3_client, docker_cli(docker_binary) if build_image else None)
    for fact in findings.facts:
        print(f"preflight: {fact}", flush=True)
    for warning in findings.warnings:
        print(f"preflight: warning: {warning}", file=sys.stderr, flush=True)
    for problem in findings.problems:
        print(f"preflight: {problem}", file=sys.stderr, flush=True)
    if findings.problems:
        count = len(findings.problems)
        raise StackError(
            f"preflight found {count} problem{'s' if count > 1 else ''} (above); nothing was created"
        )
    print("preflight: ok", flush=True)


################################################################################
# Command line
################################################################################


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _options(args: argparse.Namespace) -> DeployOptions:
    return DeployOptions(
        infra_dir=args.infra,
        region=args.region or None,
        image_uri=getattr(args, "image_uri", None) or None,
        digest_file=getattr(args, "digest_file", DEFAULT_DIGEST_FILE),
        push_command=getattr(args, "push_command", None) or None,
        baked_model=getattr(args, "baked_model", None) or None,
        backend_config=args.backend_config or None,
        var_files=tuple(args.var_file),
        variables=dict(args.var),
        allow_function_delete=getattr(args, "allow_function_delete", False),
        allow_data_loss=getattr(args, "allow_data_loss", False),
        switch_weights_source=getattr(args, "switch_weights_source", False),
        migrate_state=getattr(args, "migrate_state", False),
        wait_seconds=getattr(args, "wait_seconds", DEFAULT_WAIT_SECONDS),
    )


def _stack(options: DeployOptions) -> StackTerraform:
    return StackTerraform(options.infra_dir, env=options.terraform_env)


def _run(args: argparse.Namespace) -> int:
    options = _options(args)
    try:
        if args.deploy_command == "preflight":
            preflight(options, build_image=options.image_uri is None, docker_binary=args.docker)
            report(args, {"ok": True, "infra": str(options.infra_dir)}, [])
        elif args.deploy_command == "apply":
            needs_docker = options.image_uri is None and options.push_command is not None
            if not Path(options.infra_dir).is_dir():
                raise StackError(f"stack directory {options.infra_dir} does not exist")
            values = stack_values(options)  # once: the preflight and the apply read the same values
            preflight(options, build_image=needs_docker, docker_binary=args.docker, values=values)
            outputs = apply(options, _stack(options), values=values)
            report(args, {"outputs": outputs}, [])
        elif args.deploy_command == "rollback":
            try:
                stack = _stack(options)
            except StackError:  # no terraform: only an EFS rollback given --bucket/--instance-id can run
                return _rollback_efs_release(args)
            if deployed_weights_source(options, stack) != WEIGHTS_IN_IMAGE:
                return _rollback_efs_release(args)
            outputs = rollback(options, stack, digest=args.revision or None)
            report(args, {"outputs": outputs}, [])
        elif args.deploy_command == "plan":
            summary = plan(options, _stack(options))
            changes = [f"  {'/'.join(c['actions']):<16} {c['address']}" for c in summary.changes]
            report(
                args,
                {"image_uri": summary.image_uri, "changes": summary.changes},
                [f"==> the plan changes {len(summary.changes)} resource(s)", *changes],
            )
        else:
            destroy(options, _stack(options), confirmed=args.yes)
            report(args, {"destroyed": str(options.infra_dir)}, [])
    except StackError as exc:
        raise CommandError(str(exc)) from exc
    return 0


def _rollback_efs_release(args: argparse.Namespace) -> int:
    """An EFS stack's rollback is a release switch on EFS: ``sd-lambda rollback`` with the arguments
    after ``--`` and this command's --revision."""
    from sd_lambda.cli import main as cli_main

    forwarded = list(args.efs_arguments)
    if forwarded[:1] == ["--"]:
        forwarded = forwarded[1:]
    return cli_main(["rollback", *forwarded, "--revision", args.revision])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="plan / apply / destroy the Terraform stack (ECR first, then the image)",
        description="Plan, apply or destroy the Terraform stack in --infra, or run apply's preflight alone. "
        "apply checks credentials, terraform, docker and the account's Lambda limits, creates the ECR "
        "repository, takes the image (--image-uri, or the digest push-image leaves in .image-digest), "
        "applies everything with the function pinned to that digest and waits until the function is "
        "Active. Without a new image, plan and apply keep the one the function runs. A plan that would "
        "delete or replace the live function needs --allow-function-delete; one that would delete stored "
        "data (EFS, the weights bucket, the KMS key, the ECR repository) needs --allow-data-loss. With "
        "--json each action prints one JSON document on stdout and everything else on stderr.",
    )
    actions = parser.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    apply_parser = actions.add_parser("apply", help="registry, image, full apply, wait until Active")
    plan_parser = actions.add_parser("plan", help="terraform plan with the image apply would use")
    destroy_parser = actions.add_parser("destroy", help="terraform destroy, after confirmation")
    preflight_parser = actions.add_parser(
        "preflight",
        help="check credentials, terraform, docker and the account's Lambda limits (apply's first step)",
    )
    rollback_parser = actions.add_parser(
        "rollback",
        help='roll the served model back: with weights_source = "image", redeploy the image deployed '
        "before the running one (or --revision sha256:...); with EFS, `sd-lambda rollback` with the "
        "arguments after --",
        description="Roll the served model back. A stack whose model is baked into the image (output "
        'weights_source = "image") redeploys the image deployed before the running one, or --revision '
        "sha256:<digest>, through the same checked plan and apply as deploy apply (pass the same var "
        "files). An EFS stack switches a release instead: the arguments after -- go to `sd-lambda "
        "rollback` (--name, --lora-name, ...), with --revision.",
    )
    for action in (apply_parser, plan_parser, destroy_parser, preflight_parser, rollback_parser):
        action.add_argument("--infra", type=Path, default=DEFAULT_INFRA_DIR, help="the Terraform root")
        action.add_argument("--region", help="AWS region (also sets AWS_REGION for terraform)")
        action.add_argument("--backend-config", type=Path, help="S3 backend settings file (BACKEND_CONFIG)")
        action.add_argument(
            "--var-file", type=Path, action="append", default=[], help="tfvars file, repeatable"
        )
        add_json_flag(action)
        action.add_argument(
            "--var", type=_key_value, action="append", default=[], metavar="KEY=VALUE", help="repeatable"
        )
    for action in (apply_parser, plan_parser, destroy_parser, rollback_parser):
        action.add_argument(
            "--migrate-state",
            action="store_true",
            help="with --backend-config: copy existing local state into the S3 backend (MIGRATE_STATE=1)",
        )
    for action in (apply_parser, preflight_parser):
        action.add_argument("--docker", default="docker", help="docker CLI the image build uses")
    preflight_parser.add_argument("--image-uri", help="an image is given: docker is not needed")
    for action in (apply_parser, plan_parser):
        action.add_argument("--image-uri", help="<repo>@sha256:<digest>; default: repo + --digest-file")
        action.add_argument("--digest-file", type=Path, default=DEFAULT_DIGEST_FILE, help="from push-image")
    for action in (apply_parser, plan_parser, rollback_parser):
        action.add_argument(
            "--allow-function-delete",
            action="store_true",
            help="let the plan delete or replace the live function (its URL changes)",
        )
        action.add_argument(
            "--allow-data-loss",
            action="store_true",
            help="let the plan delete or replace the EFS file system or access point, the weights bucket, "
            "the KMS key or the ECR repository (ALLOW_DATA_LOSS=1)",
        )
    apply_parser.add_argument(
        "--switch-weights-source",
        action="store_true",
        help="let the var files change weights_source of the running stack (docs/weights-in-image.md)",
    )
    apply_parser.add_argument("--push-command", help="builds and pushes the image once the repository exists")
    apply_parser.add_argument(
        "--baked-model",
        help="the model the push command bakes into the image (MODEL_DIR or MODEL): required with "
        'weights_source = "image" when an image is built, refused with "efs"',
    )
    rollback_parser.add_argument(
        "--revision",
        default="",
        help="image stack: sha256:<digest> in the stack's repository (default: the previously deployed "
        "image); EFS stack: the release to switch to",
    )
    rollback_parser.add_argument(
        "efs_arguments", nargs=argparse.REMAINDER, help="-- then `sd-lambda rollback` arguments (EFS stacks)"
    )
    for action in (apply_parser, rollback_parser):
        action.add_argument(
            "--wait-seconds", type=int, default=DEFAULT_WAIT_SECONDS, help="bound on the wait for Active"
        )
    destroy_parser.add_argument("--yes", action="store_true", help="do not ask for confirmation (CONFIRM=1)")
    parser.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    from sd_lambda.cli import main as cli_main  # cli imports this module to register the subcommand

    return cli_main(["deploy", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
