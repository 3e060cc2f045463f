"""Deploy the stack: ``sd-lambda deploy plan|apply|destroy`` (``make plan/apply/destroy``).

The function needs an image pinned by digest, and the image needs the ECR repository the stack creates.
``apply`` breaks that loop in stages: a targeted apply of the repository, then the image (``--image-uri``
or the digest ``make push-image`` leaves in ``.image-digest``), then the full apply with
``image_uri = <repo>@sha256:<digest>``, then a wait until Lambda reports the function Active.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sd_lambda.cli import CommandError
from sd_lambda.stack_outputs import DEFAULT_INFRA_DIR, StackError, StackTerraform

# What the targeted first stage creates; everything else needs the image.
REGISTRY_TARGETS: tuple[str, ...] = (
    "module.lambda.aws_ecr_repository.this",
    "module.lambda.aws_ecr_lifecycle_policy.this",
    "module.lambda.aws_ecr_repository_policy.this",
)
DEFAULT_DIGEST_FILE = Path(".image-digest")
WAIT_POLL_SECONDS = 5
DEFAULT_WAIT_SECONDS = 900

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PINNED_IMAGE = re.compile(
    r"^(?P<registry>[0-9]{12}\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?)"
    r"/(?P<repository>[a-z0-9][a-z0-9._/-]*)@(?P<digest>sha256:[0-9a-f]{64})$"
)


class Stack(Protocol):
    """What the driver needs from Terraform (:class:`~sd_lambda.stack_outputs.StackTerraform`)."""

    def init(self, backend_config: Path | None = None) -> None: ...
    def plan(self, variables: Mapping[str, Any], var_files: Sequence[Path] = ()) -> None: ...
    def apply(
        self, variables: Mapping[str, Any], var_files: Sequence[Path] = (), targets: Sequence[str] = ()
    ) -> None: ...
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
    backend_config: Path | None = None
    var_files: tuple[Path, ...] = ()
    variables: dict[str, str] = field(default_factory=dict)
    registry_targets: tuple[str, ...] = REGISTRY_TARGETS
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
            "or pass IMAGE_URI=<ecr_repository_url>@sha256:<digest>"
        ) from None
    if re.fullmatch(r"[0-9a-f]{64}", text):
        return f"sha256:{text}"
    match = _DIGEST.search(text)
    if match is None:
        raise StackError(f"{digest_file} holds no sha256:<64 hex> image digest (found {text[:80]!r})")
    return match.group(0)


def verify_image(ecr: Any, image: PinnedImage) -> None:
    """Fail early, with the repository named, when the digest is not in the registry."""
    try:
        ecr.describe_images(repositoryName=image.repository, imageIds=[{"imageDigest": image.digest}])
    except ecr.exceptions.ImageNotFoundException:
        raise StackError(
            f"image {image.digest} is not in ECR repository {image.repository}: "
            "push it first (`make push-image`)"
        ) from None
    except ecr.exceptions.RepositoryNotFoundException:
        raise StackError(f"ECR repository {image.repository} does not exist in {image.region}") from None


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


def _image_from_digest(stack: Stack, options: DeployOptions) -> str | None:
    """``<repo>@<digest>`` when both the repository and a digest file exist, else None."""
    repository_url = _repository_url(stack)
    if repository_url is None or not Path(options.digest_file).is_file():
        return None
    return f"{repository_url}@{read_digest(options.digest_file)}"


def apply(options: DeployOptions, stack: Stack, clients: ClientFactory = boto3_client) -> dict[str, Any]:
    """Registry first, then the image, then everything, then wait until Active. Returns the outputs."""
    variables = options.terraform_variables
    stack.init(options.backend_config)

    print("==> stage 1/3: the ECR repository (targeted apply)", flush=True)
    stack.apply(variables, options.var_files, targets=options.registry_targets)
    repository_url = _repository_url(stack)
    if repository_url is None:
        raise StackError("the targeted apply left no ecr_repository_url output")

    image_uri = options.image_uri
    if image_uri is None:
        if options.push_command:
            run_push_command(options.push_command, repository_url)
        image_uri = f"{repository_url}@{read_digest(options.digest_file)}"
    image = parse_pinned_image(image_uri)
    verify_image(clients("ecr", image.region), image)

    print(f"==> stage 2/3: the full stack with image_uri={image.uri}", flush=True)
    stack.apply({**variables, "image_uri": image.uri}, options.var_files)
    outputs = stack.outputs()
    function_name = outputs.get("function_name")
    if not function_name:
        raise StackError("the apply left no function_name output")

    region = outputs.get("region") or image.region
    print(f"==> stage 3/3: waiting for {function_name} to be Active", flush=True)
    wait_until_ready(clients("lambda", region), function_name, options.wait_seconds)
    print(f"==> ready: {outputs.get('function_url')}", flush=True)
    return outputs


def plan(options: DeployOptions, stack: Stack) -> str | None:
    """Plan with the image that ``apply`` would deploy; without one, plan everything but the function."""
    stack.init(options.backend_config)
    image_uri = options.image_uri or _image_from_digest(stack, options)
    variables = options.terraform_variables
    if image_uri is not None:
        variables["image_uri"] = parse_pinned_image(image_uri).uri
    else:
        print(
            "==> no image yet (no IMAGE_URI, no repository + .image-digest): planning without the function",
            flush=True,
        )
    stack.plan(variables, options.var_files)
    return image_uri


def destroy(
    options: DeployOptions, stack: Stack, confirmed: bool, ask: Callable[[str], str] | None = None
) -> None:
    """``terraform destroy`` after an explicit confirmation (or ``confirmed``, i.e. CONFIRM=1).

    ``ask`` prompts for the answer; by default the terminal, and no terminal means no confirmation.
    """
    if not confirmed:
        if ask is None:
            if not sys.stdin.isatty():
                raise StackError(
                    "refusing to destroy without confirmation: rerun with CONFIRM=1 (make) or --yes"
                )
            ask = input
        answer = ask(
            f"Destroy every resource of the stack in {options.infra_dir}? Type 'destroy' to confirm: "
        )
        if answer.strip() != "destroy":
            raise StackError("destroy cancelled")
    stack.init(options.backend_config)
    print(
        "==> destroying; Lambda can take 20-60 minutes to release the function's network interfaces",
        flush=True,
    )
    stack.destroy(options.terraform_variables, options.var_files)


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
        infra_dir=args.infra_dir,
        region=args.region or None,
        image_uri=getattr(args, "image_uri", None) or None,
        digest_file=getattr(args, "digest_file", DEFAULT_DIGEST_FILE),
        push_command=getattr(args, "push_command", None) or None,
        backend_config=args.backend_config or None,
        var_files=tuple(args.var_file),
        variables=dict(args.var),
        wait_seconds=getattr(args, "wait_seconds", DEFAULT_WAIT_SECONDS),
    )


def _stack(options: DeployOptions) -> StackTerraform:
    return StackTerraform(options.infra_dir, env=options.terraform_env)


def _run(args: argparse.Namespace) -> int:
    options = _options(args)
    try:
        if args.deploy_command == "apply":
            apply(options, _stack(options))
        elif args.deploy_command == "plan":
            plan(options, _stack(options))
        else:
            destroy(options, _stack(options), confirmed=args.yes)
    except StackError as exc:
        raise CommandError(str(exc)) from exc
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="plan / apply / destroy the Terraform stack (ECR first, then the image)",
        description=__doc__,
    )
    actions = parser.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    apply_parser = actions.add_parser("apply", help="registry, image, full apply, wait until Active")
    plan_parser = actions.add_parser("plan", help="terraform plan with the image apply would use")
    destroy_parser = actions.add_parser("destroy", help="terraform destroy, after confirmation")
    for action in (apply_parser, plan_parser, destroy_parser):
        action.add_argument("--infra-dir", type=Path, default=DEFAULT_INFRA_DIR, help="stack directory")
        action.add_argument("--region", help="AWS region (also sets AWS_REGION for terraform)")
        action.add_argument("--backend-config", type=Path, help="S3 backend settings file (BACKEND_CONFIG)")
        action.add_argument("--var-file", type=Path, action="append", default=[], help="tfvars (repeatable)")
        action.add_argument(
            "--var", type=_key_value, action="append", default=[], metavar="KEY=VALUE", help="repeatable"
        )
    for action in (apply_parser, plan_parser):
        action.add_argument("--image-uri", help="<repo>@sha256:<digest>; default: repo + --digest-file")
        action.add_argument("--digest-file", type=Path, default=DEFAULT_DIGEST_FILE, help="from push-image")
    apply_parser.add_argument("--push-command", help="builds and pushes the image once the repository exists")
    apply_parser.add_argument(
        "--wait-seconds", type=int, default=DEFAULT_WAIT_SECONDS, help="bound on the wait for Active"
    )
    destroy_parser.add_argument("--yes", action="store_true", help="do not ask for confirmation (CONFIRM=1)")
    parser.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    from sd_lambda.cli import main as cli_main  # cli imports this module to register the subcommand

    return cli_main(["deploy", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
