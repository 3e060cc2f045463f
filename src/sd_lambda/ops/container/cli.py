"""``sd-lambda requirements | build-image | push-image``: the container image's operator commands."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sd_lambda.ops.container import baked as baked_image
    from sd_lambda.ops.container.docker import Docker

DEFAULT_PYPROJECT = Path("pyproject.toml")
DEFAULT_LOCK = Path("image/requirements.txt")
DEFAULT_TORCH_LOCK = Path("image/requirements-torch.txt")
DEFAULT_OPENVINO_LOCK = Path("image/requirements-openvino.txt")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "requirements",
        help="regenerate (or --check) the images' hash-pinned locks from pyproject's dependencies",
        description="Resolve pyproject's base + runtime dependencies (the torch image) and base + openvino "
        "dependencies (the OpenVINO image) with `uv pip compile --generate-hashes` and write "
        "image/requirements.txt (PyPI) with image/requirements-torch.txt (the CPU build of torch), and "
        "image/requirements-openvino.txt, keeping the pins already locked wherever they still fit (delete "
        "the locks to upgrade everything).",
    )
    parser.add_argument("--pyproject", type=Path, default=DEFAULT_PYPROJECT)
    parser.add_argument("--output", type=Path, default=DEFAULT_LOCK)
    parser.add_argument("--torch-output", type=Path, default=DEFAULT_TORCH_LOCK)
    parser.add_argument("--openvino-output", type=Path, default=DEFAULT_OPENVINO_LOCK)
    parser.add_argument(
        "--check", action="store_true", help="only verify the existing locks against pyproject (offline)"
    )
    parser.add_argument(
        "--torch-index-url",
        action="append",
        default=[],
        help="index to resolve the CPU torch build from (default, unless --find-links: "
        "https://download.pytorch.org/whl/cpu)",
    )
    parser.add_argument(
        "--find-links",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder holding the CPU torch wheel, for machines that cannot reach PyTorch's index",
    )
    parser.set_defaults(func=run_requirements)
    register_image_commands(subparsers)


def run_requirements(args: argparse.Namespace) -> int:
    from sd_lambda.cli import CommandError
    from sd_lambda.ops.container import requirements

    if not args.pyproject.is_file():
        raise CommandError(f"{args.pyproject} not found (run from the repository root)")
    dependencies = requirements.ProjectDependencies.from_pyproject(args.pyproject)
    torch_variant, openvino_variant = requirements.VARIANTS["torch"], requirements.VARIANTS["openvino"]
    locks = (args.output, args.torch_output, args.openvino_output)
    try:
        if args.check:
            missing = [str(path) for path in locks if not path.is_file()]
            if missing:
                raise CommandError(f"{', '.join(missing)} not found: run `make requirements`")
            pypi = requirements.parse(args.output.read_text())
            torch = requirements.parse(args.torch_output.read_text())
            openvino = requirements.parse(args.openvino_output.read_text())
            problems = requirements.check([*pypi, *torch], dependencies, torch_variant)
            problems += requirements.check_split(pypi, torch)
            problems += [
                f"{args.openvino_output}: {problem}"
                for problem in requirements.check(openvino, dependencies, openvino_variant)
            ]
            if problems:
                raise CommandError(f"the image locks are out of date: {'; '.join(problems)}")
            print(f"{', '.join(map(str, locks))} match {args.pyproject}")
            return 0
        index_urls = args.torch_index_url or ([] if args.find_links else [requirements.DEFAULT_TORCH_INDEX])
        entries = requirements.resolve(
            dependencies.image_for(torch_variant),
            extra_index_urls=index_urls,
            find_links=args.find_links,
            preferred=requirements.read_locks(args.output, args.torch_output),
        )
        # PyPI only: nothing in this image comes from PyTorch's index. The torch image's pins come first
        # among the preferred, so the packages both images hold (pydantic, pillow, ...) stay one version.
        torch_image_pins = requirements.read_locks(args.output, args.torch_output)
        locked = {entry.name for entry in torch_image_pins}
        openvino = requirements.resolve(
            dependencies.image_for(openvino_variant),
            extra_index_urls=[],
            find_links=[],
            preferred=[
                *torch_image_pins,
                *(e for e in requirements.read_locks(args.openvino_output) if e.name not in locked),
            ],
        )
    except requirements.RequirementsError as exc:
        raise CommandError(str(exc)) from exc
    problems = requirements.check(entries, dependencies, torch_variant)
    problems += [f"[openvino]: {p}" for p in requirements.check(openvino, dependencies, openvino_variant)]
    if problems:
        raise CommandError(f"the resolution does not satisfy pyproject: {'; '.join(problems)}")
    pypi, torch = requirements.split(entries)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(requirements.render(pypi))
    args.torch_output.write_text(requirements.render(torch, requirements.TORCH_HEADER))
    args.openvino_output.parent.mkdir(parents=True, exist_ok=True)
    args.openvino_output.write_text(requirements.render(openvino, requirements.OPENVINO_HEADER))
    print(
        f"wrote {len(pypi)} hash-pinned packages to {args.output}, torch to {args.torch_output} and "
        f"{len(openvino)} to {args.openvino_output}"
    )
    return 0


# ---- build-image / push-image ------------------------------------------------------------------------

DEFAULT_LOCAL_IMAGE = "sd-lambda:local"


def docker_cli(binary: str) -> Docker:
    """The docker runner the commands use (tests replace this function)."""
    from sd_lambda.ops.container.docker import DockerCLI

    return DockerCLI(binary)


def _add_engine_argument(parser: argparse.ArgumentParser, what: str) -> None:
    from sd_lambda.layout import ENGINES
    from sd_lambda.ops.container.docker import DEFAULT_ENGINE

    # No argparse choices: an unknown engine is one line naming ENGINE= (see engine_of), not a usage dump.
    parser.add_argument(
        "--engine",
        default=DEFAULT_ENGINE,
        help=f"the image variant ({' or '.join(ENGINES)}): {what}",
    )


def engine_of(args: argparse.Namespace) -> str:
    """``--engine``, refused in one line unless it names an engine."""
    from sd_lambda.cli import CommandError, option
    from sd_lambda.layout import ENGINES

    if args.engine not in ENGINES:
        named = option("--engine")
        given = f"{named}{args.engine}" if named.endswith("=") else f"{named} {args.engine}"
        raise CommandError(f"{given} is not an engine: use {' or '.join(ENGINES)}")
    return args.engine


def register_image_commands(subparsers: argparse._SubParsersAction) -> None:
    from sd_lambda.cli import WORK_DIR
    from sd_lambda.ops.container.docker import DEFAULT_DOCKERFILE, DEFAULT_PLATFORM, PLATFORMS
    from sd_lambda.ops.deploy import DEFAULT_DIGEST_FILE

    build = subparsers.add_parser(
        "build-image",
        help="docker build the Lambda image (linux/amd64 by default, --platform linux/arm64)",
        description="Build image/Dockerfile from the repository root with `docker build --platform`: the "
        "torch image, or with --engine openvino the lean OpenVINO one (no torch), tagged <tag>-openvino.",
    )
    build.add_argument("--platform", choices=PLATFORMS, default=DEFAULT_PLATFORM)
    build.add_argument(
        "--tag", default=DEFAULT_LOCAL_IMAGE, help="local image name (another engine's gets -<engine>)"
    )
    _add_engine_argument(build, "passed as the Dockerfile's ENGINE build arg")
    build.add_argument("--dockerfile", type=Path, default=DEFAULT_DOCKERFILE)
    build.add_argument("--context", type=Path, default=Path("."))
    build.add_argument(
        "--build-arg", action="append", default=[], metavar="NAME=VALUE", help="e.g. BASE_DIGEST=sha256:..."
    )
    build.add_argument("--docker", default="docker", help="docker CLI to run")
    model = build.add_mutually_exclusive_group()
    model.add_argument(
        "--model-dir",
        type=Path,
        help='bake this model into the image (weights_source = "image"): an EFS-layout model folder '
        "(its current release), a release folder with its manifest, or a diffusers folder",
    )
    model.add_argument(
        "--model",
        metavar="HUB_ID[@REV]",
        help="bake this Hugging Face Hub pipeline into the image, downloaded as seed-models downloads it",
    )
    build.add_argument(
        "--name",
        help="the baked model's folder, the image's MODEL_NAME (default: the folder's or hub id's slug)",
    )
    build.add_argument(
        "--work-dir",
        type=Path,
        default=WORK_DIR,
        help="hub downloads and the baked image's build context",
    )
    build.set_defaults(func=run_build_image)

    push = subparsers.add_parser(
        "push-image",
        help="push the built image to the stack's ECR repository and write .image-digest",
        description="Log in to ECR (GetAuthorizationToken), tag with the git commit, push, record the digest",
    )
    push.add_argument(
        "--image", default=DEFAULT_LOCAL_IMAGE, help="local image to push (another engine's gets -<engine>)"
    )
    _add_engine_argument(push, "which build to push; its remote tag ends in -<engine> too")
    where = push.add_mutually_exclusive_group()
    where.add_argument("--repository-url", help="<account>.dkr.ecr.<region>.amazonaws.com/<name>")
    where.add_argument(
        "--infra", type=Path, default=Path("infra"), help="stack whose ecr_repository_url to use"
    )
    push.add_argument(
        "--tag",
        help="remote tag (default: git-<sha>, plus -dirty-<time> for a dirty tree; -<engine> for "
        "another engine's image)",
    )
    push.add_argument("--digest-file", type=Path, default=DEFAULT_DIGEST_FILE)
    push.add_argument("--docker", default="docker", help="docker CLI to run")
    push.set_defaults(func=run_push_image)


def run_build_image(args: argparse.Namespace) -> int:
    from sd_lambda.cli import CommandError, option
    from sd_lambda.ops.container import baked as baked_image
    from sd_lambda.ops.container.docker import (
        DEFAULT_ENGINE,
        ENGINE_BUILD_ARG,
        DockerFailed,
        DockerUnavailable,
        build,
        engine_image,
    )

    engine = engine_of(args)
    build_args = {}
    for item in args.build_arg:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CommandError(f"--build-arg {item!r} is not NAME=VALUE")
        if name == ENGINE_BUILD_ARG:
            raise CommandError(f"choose the engine with {option('--engine')}, not a build arg")
        build_args[name] = value
    if engine != DEFAULT_ENGINE:
        # The Dockerfile's own default is the default engine (a test holds them equal), so the default
        # build's command stays what it always was.
        build_args[ENGINE_BUILD_ARG] = engine
    if not args.dockerfile.is_file():
        raise CommandError(f"{args.dockerfile} not found (run from the repository root)")
    tag = engine_image(args.tag, engine)
    baked = _release_to_bake(args, engine)
    docker = docker_cli(args.docker)
    try:
        if baked is not None:
            baked_image.check_builder(docker)
        build(
            docker,
            tag if baked is None else f"{tag}{baked_image.BASE_SUFFIX}",
            platform=args.platform,
            dockerfile=args.dockerfile,
            context=args.context,
            build_args=build_args,
        )
        if baked is not None:
            size = _bake(docker, tag, baked, args)
    except (DockerUnavailable, DockerFailed, baked_image.BakeError) as exc:
        raise CommandError(str(exc)) from None
    if baked is None:
        print(f"built {tag} for {args.platform} ({engine} engine)")
    else:
        print(f"built {tag} for {args.platform} ({engine} engine, model {baked.label} inside, {size} bytes)")
    return 0


def _release_to_bake(args: argparse.Namespace, engine: str) -> baked_image.BakedRelease | None:
    """The release --model-dir or --model names, checked before any build runs; None without one."""
    from sd_lambda.cli import CommandError, option
    from sd_lambda.layout import model_slug
    from sd_lambda.ops.container import baked as baked_image
    from sd_lambda.seeding.errors import SeedError

    if args.model_dir is None and args.model is None:
        if args.name:
            raise CommandError(
                f"{option('--name')} names a baked model: add {option('--model-dir')} or {option('--model')}"
            )
        return None
    if not baked_image.BAKED_DOCKERFILE.is_file():
        raise CommandError(f"{baked_image.BAKED_DOCKERFILE} not found (run from the repository root)")
    try:
        if args.model_dir is not None:
            baked = baked_image.release_from_dir(args.model_dir, args.name)
        else:
            from sd_lambda.seeding import sources

            release = sources.from_hub(args.model, args.work_dir)
            repo, _ = sources.parse_model_ref(args.model)
            name = args.name or model_slug(repo)
            baked = baked_image.BakedRelease(name, release.revision, release)
        baked_image.check_fits(0, baked)
    except (baked_image.BakeError, SeedError) as exc:
        raise CommandError(str(exc)) from None
    if baked.engine != engine:
        raise CommandError(
            f"{baked.label} is a release for the {baked.engine} engine: build it with "
            f"{option('--engine')}{'' if option('--engine').endswith('=') else ' '}{baked.engine}"
        )
    return baked


def _bake(docker: Docker, tag: str, baked: baked_image.BakedRelease, args: argparse.Namespace) -> int:
    """The second build: <tag>-base plus the release; returns the final image's size."""
    from sd_lambda.ops.container import baked as baked_image
    from sd_lambda.ops.container.docker import build

    base = f"{tag}{baked_image.BASE_SUFFIX}"
    baked_image.check_fits(baked_image.image_size(docker, base), baked)
    context = args.work_dir / "baked-image-context"
    try:
        baked_image.stage_context(baked, context)
        build(
            docker,
            tag,
            platform=args.platform,
            dockerfile=baked_image.BAKED_DOCKERFILE,
            context=context,
            build_args={"BASE_IMAGE": base, "MODEL_NAME": baked.name, "MODEL_REVISION": baked.revision},
        )
    finally:
        shutil.rmtree(context, ignore_errors=True)
    return baked_image.image_size(docker, tag)


def run_push_image(args: argparse.Namespace) -> int:
    import boto3
    import botocore.exceptions

    from sd_lambda.cli import CommandError
    from sd_lambda.ops.container import baked as baked_image
    from sd_lambda.ops.container import registry
    from sd_lambda.ops.container.docker import DockerFailed, DockerUnavailable, engine_image, engine_tag
    from sd_lambda.ops.stack_outputs import output_for_command

    engine = engine_of(args)
    try:
        repository = registry.Repository.parse(
            args.repository_url or output_for_command(args.infra, "ecr_repository_url", "--repository-url")
        )
        local_image = engine_image(args.image, engine)
        docker = docker_cli(args.docker)
        tag = engine_tag(args.tag or registry.image_tag(registry.git_state()), engine)
        # A baked image's tag names its model: ECR's tags are immutable, so one commit's model-less and
        # baked images (or two models) must never share one.
        tag = baked_image.model_tag(tag, baked_image.baked_model(docker, local_image))
        ecr = boto3.client("ecr", region_name=repository.region)
        result = registry.push(docker, ecr, local_image, repository, tag)
    except (registry.PushError, DockerUnavailable, DockerFailed, baked_image.BakeError) as exc:
        raise CommandError(str(exc)) from None
    except botocore.exceptions.NoCredentialsError:
        raise CommandError(
            "no AWS credentials found: configure a profile, SSO or environment credentials"
        ) from None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise CommandError(f"ECR: {exc}") from None
    registry.write_reference(args.digest_file, result.reference)
    verb = "pushed" if result.pushed else "already in ECR (tags are immutable), reusing"
    print(f"{verb} {repository.url}:{result.tag}")
    print(result.reference)
    print(f"wrote {args.digest_file}")
    return 0
