"""Push the built image to ECR and record exactly what was pushed: ``<repository>@sha256:<digest>``.

The Lambda is deployed from that digest (``.image-digest``, read by ``sd_lambda.ops.deploy``), never from a
tag, so what runs is exactly what was pushed. Tags are the git commit (``git-<sha>``), plus a timestamp
when the tree has uncommitted changes; the repository's tags are immutable, so a clean commit that is
already in ECR is not pushed again: its digest is reused.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sd_lambda.ops.container.docker import Docker, require_engine
from sd_lambda.ops.container.manifest import lambda_manifest_problem

REPOSITORY_URL = re.compile(
    r"^(?P<registry>(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?)"
    r"/(?P<name>[a-z0-9][a-z0-9._/-]*)\Z"
)


class PushError(Exception):
    """A one-line reason the push could not happen or could not be confirmed."""


@dataclass(frozen=True)
class Repository:
    url: str
    registry: str
    account: str
    region: str
    name: str

    @classmethod
    def parse(cls, url: str) -> Repository:
        match = REPOSITORY_URL.match(url.strip().removeprefix("https://").rstrip("/"))
        if match is None:
            raise PushError(
                f"{url!r} is not an ECR repository URL (<account>.dkr.ecr.<region>.amazonaws.com/<name>)"
            )
        return cls(match.group(0), match["registry"], match["account"], match["region"], match["name"])


@dataclass(frozen=True)
class RegistryLogin:
    registry: str
    username: str
    password: str


def ecr_login(ecr: Any, repository: Repository) -> RegistryLogin:
    """A short-lived docker login for the repository's registry, from ``ecr:GetAuthorizationToken``."""
    data = ecr.get_authorization_token(registryIds=[repository.account])["authorizationData"][0]
    username, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    if not password:
        raise PushError("ECR returned an authorization token without a password")
    return RegistryLogin(repository.registry, username, password)


@dataclass(frozen=True)
class GitState:
    sha: str
    dirty: bool


def git_state(cwd: Path = Path(".")) -> GitState:
    def git(*args: str) -> str:
        completed = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise PushError(f"git {args[0]} failed: {completed.stderr.strip() or 'not a git checkout?'}")
        return completed.stdout.strip()

    return GitState(
        sha=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--untracked-files=no"))
    )


def image_tag(state: GitState, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> str:
    tag = f"git-{state.sha[:12]}"
    return f"{tag}-dirty-{now():%Y%m%dT%H%M%SZ}" if state.dirty else tag


@dataclass(frozen=True)
class StoredImage:
    digest: str
    media_type: str | None  # ECR's imageManifestMediaType: what Lambda will be handed


def stored_image(ecr: Any, repository: Repository, tag: str) -> StoredImage | None:
    """What ECR holds under ``tag`` (digest and manifest media type), or None if the tag is not there."""
    try:
        details = ecr.describe_images(
            registryId=repository.account, repositoryName=repository.name, imageIds=[{"imageTag": tag}]
        )
    except ecr.exceptions.ImageNotFoundException:
        return None
    except ecr.exceptions.RepositoryNotFoundException:
        raise PushError(
            f"ECR repository {repository.name} does not exist in {repository.region}: deploy the stack first"
        ) from None
    images = details.get("imageDetails", [])
    if not images:
        return None
    return StoredImage(images[0]["imageDigest"], images[0].get("imageManifestMediaType"))


def _runnable(repository: Repository, tag: str, image: StoredImage, pushed: bool) -> PushResult:
    """The push result, or a PushError when Lambda would refuse the stored manifest."""
    problem = lambda_manifest_problem(f"{repository.url}:{tag}", image.media_type)
    if problem is not None:
        hint = "" if pushed else " (its tag is immutable: commit first or pass --tag)"
        raise PushError(problem + hint)
    return PushResult(f"{repository.url}@{image.digest}", tag, pushed=pushed)


@dataclass(frozen=True)
class PushResult:
    reference: str  # <repository url>@sha256:<digest>
    tag: str
    pushed: bool  # False when the same clean commit was already in ECR


def push(docker: Docker, ecr: Any, local_image: str, repository: Repository, tag: str) -> PushResult:
    """Tag ``local_image`` as ``repository:tag``, push it, and return the digest ECR recorded."""
    require_engine(docker)
    docker(["image", "inspect", "--format", "{{.Id}}", local_image])  # fails clearly if never built
    existing = stored_image(ecr, repository, tag)
    if existing is not None:
        return _runnable(repository, tag, existing, pushed=False)
    remote = f"{repository.url}:{tag}"
    login = ecr_login(ecr, repository)
    # A throwaway DOCKER_CONFIG: the ECR token never lands in ~/.docker/config.json.
    with tempfile.TemporaryDirectory(prefix="sd-lambda-docker-") as config_dir:
        env = {"DOCKER_CONFIG": config_dir}
        docker(
            ["login", "--username", login.username, "--password-stdin", login.registry],
            stdin=login.password,
            env=env,
        )
        docker(["tag", local_image, remote], env=env)
        docker(["push", remote], env=env)
    image = stored_image(ecr, repository, tag)
    if image is None:
        raise PushError(
            f"docker push reported success but ECR has no image tagged {tag} in {repository.name}"
        )
    return _runnable(repository, tag, image, pushed=True)


def write_reference(path: Path, reference: str) -> None:
    """Write ``<repo>@sha256:<digest>`` atomically: a reader never sees half a reference."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(reference + "\n")
    os.replace(temporary, path)


DEPLOYED_TAG_PREFIX = "deployed-"


def deployed_tag(now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> str:
    """``deployed-<UTC yyyymmddThhmmssZ>``: the tag the ECR lifecycle's first rule keeps."""
    return f"{DEPLOYED_TAG_PREFIX}{now():%Y%m%dT%H%M%SZ}"


def add_tag(ecr: Any, repository_name: str, digest: str, tag: str) -> None:
    """Give the image ``digest`` one more tag, without docker: its manifest is put again under ``tag``.

    Tag immutability forbids moving a tag to another image, not adding a new tag to an existing one
    (https://docs.aws.amazon.com/AmazonECR/latest/userguide/image-retag.html,
    https://docs.aws.amazon.com/AmazonECR/latest/userguide/image-tag-mutability.html).
    """
    from botocore.exceptions import ClientError

    try:
        images = ecr.batch_get_image(repositoryName=repository_name, imageIds=[{"imageDigest": digest}])
        if not images.get("images"):
            raise PushError(f"image {digest} is not in ECR repository {repository_name}: cannot tag it {tag}")
        image = images["images"][0]
        media_type = image.get("imageManifestMediaType")
        ecr.put_image(
            repositoryName=repository_name,
            imageManifest=image["imageManifest"],
            imageTag=tag,
            imageDigest=digest,
            **({"imageManifestMediaType": media_type} if media_type else {}),
        )
    except ecr.exceptions.ImageAlreadyExistsException:
        # PutImage's answer when this digest already carries this tag: the tag is there, as wanted.
        # https://docs.aws.amazon.com/AmazonECR/latest/APIReference/API_PutImage.html
        return
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        hint = (
            "the deploying identity needs ecr:BatchGetImage and ecr:PutImage on the repository"
            if "AccessDenied" in code or "Unauthorized" in code
            else "rerun the apply"
        )
        raise PushError(
            f"could not tag {repository_name}@{digest} as {tag} ({code}: {error.get('Message')}); {hint}"
        ) from None


def repository_images(ecr: Any, repository_name: str) -> list[dict[str, Any]]:
    """Every image ECR lists in ``repository_name`` (DescribeImages, all pages: digest, tags, push time,
    manifest media type), or a one-line PushError naming the permission when ECR refuses.
    https://docs.aws.amazon.com/AmazonECR/latest/APIReference/API_DescribeImages.html
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return [
            image
            for page in ecr.get_paginator("describe_images").paginate(repositoryName=repository_name)
            for image in page["imageDetails"]
        ]
    except ecr.exceptions.RepositoryNotFoundException:
        raise PushError(f"ECR repository {repository_name} does not exist") from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        hint = (
            "; the deploying identity needs ecr:DescribeImages on the repository"
            if "AccessDenied" in code or "Unauthorized" in code
            else ""
        )
        raise PushError(
            f"cannot list the images of ECR repository {repository_name} (ecr:DescribeImages): "
            f"{code}: {error.get('Message')}{hint}"
        ) from None
    except BotoCoreError as exc:
        raise PushError(
            f"cannot list the images of ECR repository {repository_name} (ecr:DescribeImages): {exc}"
        ) from None


def deployed_images_pushed_after(images: list[dict[str, Any]], digest: str) -> int:
    """How many other ``deployed-*`` images of the listing ``images`` (:func:`repository_images`) were
    pushed after ``digest`` (the lifecycle's order).

    ``imageCountMoreThan`` ranks images by push time, and adding a tag does not change it, so an older
    image deployed again (a rollback) ranks behind every newer deployed one.
    https://docs.aws.amazon.com/AmazonECR/latest/userguide/lifecycle_policy_parameters.html
    """
    pushed_at = next((image["imagePushedAt"] for image in images if image["imageDigest"] == digest), None)
    if pushed_at is None:
        # Not listed: deleted since it was checked, or never there. No order to rank it by.
        raise PushError(f"image {digest} is not in the repository's image list: push it again")
    return sum(
        1
        for image in images
        if image["imageDigest"] != digest
        and image["imagePushedAt"] > pushed_at
        and any(tag.startswith(DEPLOYED_TAG_PREFIX) for tag in image.get("imageTags", []))
    )
