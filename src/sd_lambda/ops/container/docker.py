"""The docker CLI, behind one small seam so build and push logic can be tested without an engine."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DEFAULT_PLATFORM = "linux/amd64"
PLATFORMS = ("linux/amd64", "linux/arm64")
DEFAULT_DOCKERFILE = Path("image/Dockerfile")
# image/Dockerfile's build arg choosing the variant (the engine its venv serves); torch is its default.
ENGINE_BUILD_ARG = "ENGINE"
DEFAULT_ENGINE = "torch"


class DockerUnavailable(Exception):
    """No docker CLI, or no engine behind it: build and push cannot run on this machine."""


class DockerFailed(Exception):
    """A docker command ran and failed; the message carries its last line of output."""


class Docker(Protocol):
    def __call__(
        self, args: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        """Run ``docker <args>``; return stdout, raise DockerFailed on a non-zero exit."""
        ...


@dataclass
class DockerCLI:
    """The real thing: ``docker`` from PATH. Output of long commands (build, push) streams to the terminal."""

    binary: str = "docker"
    stream: bool = True

    def _resolve(self) -> str:
        path = shutil.which(self.binary)
        if path is None:
            raise DockerUnavailable(
                f"{self.binary} not found on PATH: building and pushing the image needs Docker "
                "(this machine has none; use a workstation or CI runner with a Docker engine)"
            )
        return path

    def __call__(
        self, args: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        import os

        streaming = self.stream and _long_running(args)
        completed = subprocess.run(
            [self._resolve(), *args],
            input=stdin,
            text=True,
            capture_output=not streaming,
            env={**os.environ, **(env or {})},
            check=False,
        )
        if completed.returncode != 0:
            detail = _last_line(completed.stderr or completed.stdout or "")
            raise DockerFailed(f"docker {_command_name(args)} failed (exit {completed.returncode}){detail}")
        return completed.stdout or ""


# Commands that take minutes and whose progress the user watches; everything else (e.g. `buildx version`,
# whose output has_buildx reads) is captured.
_STREAMED = (("build",), ("push",), ("buildx", "build"))


def _long_running(args: Sequence[str]) -> bool:
    return any(tuple(args[: len(command)]) == command for command in _STREAMED)


def _command_name(args: Sequence[str]) -> str:
    """``buildx build`` for a plugin command, else the first word; empty args are just ``docker``."""
    words = list(args[:2]) if list(args[:1]) == ["buildx"] else list(args[:1])
    return " ".join(words) or "(no command)"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f": {lines[-1]}" if lines else ""


def require_engine(docker: Docker) -> None:
    """Fail with one clear line unless a Docker engine answers."""
    try:
        docker(["version", "--format", "{{.Server.Version}}"])
    except DockerFailed as exc:
        raise DockerUnavailable(
            f"the Docker engine is not reachable ({exc}); start Docker and retry"
        ) from None


def has_buildx(docker: Docker) -> bool:
    """Whether the docker CLI has the buildx plugin (BuildKit); without it only the legacy builder runs."""
    try:
        docker(["buildx", "version"])
    except DockerFailed:
        return False
    return True


# BuildKit attaches a provenance attestation by default (and an SBOM when asked), which turns even a
# single-platform push into an OCI image index; Lambda runs only a single image manifest, Docker v2
# schema 2 or OCI (https://docs.aws.amazon.com/lambda/latest/dg/images-create.html), so both are off.
# `buildx build` (not `build`) because only buildx knows these flags: `docker build` is the legacy
# builder when DOCKER_BUILDKIT=0, and --load keeps the result in the local image store for any driver.
BUILDX_SINGLE_MANIFEST = ("buildx", "build", "--load", "--provenance=false", "--sbom=false")


def build_command(
    tag: str,
    platform: str = DEFAULT_PLATFORM,
    dockerfile: Path = DEFAULT_DOCKERFILE,
    context: Path = Path("."),
    build_args: Mapping[str, str] | None = None,
    buildx: bool = True,
) -> list[str]:
    """``docker buildx build`` without attestations; without buildx, the legacy ``docker build``, whose
    pushes are single Docker v2 schema 2 manifests already (it has no attestations to turn off)."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r} is not one Lambda runs: use one of {', '.join(PLATFORMS)}")
    builder = list(BUILDX_SINGLE_MANIFEST) if buildx else ["build"]
    command = [*builder, "--platform", platform, "--file", str(dockerfile), "--tag", tag]
    for name, value in (build_args or {}).items():
        command += ["--build-arg", f"{name}={value}"]
    return [*command, str(context)]


def build(docker: Docker, tag: str, **options: object) -> None:
    require_engine(docker)
    docker(build_command(tag, buildx=has_buildx(docker), **options))  # type: ignore[arg-type]


def engine_suffix(engine: str) -> str:
    """What a variant's tags end with: nothing for the default (torch) image, ``-<engine>`` for another,
    so a tag never names two variants (ECR's tags are immutable: a second push under one tag would
    silently reuse the first variant's image)."""
    return "" if engine == DEFAULT_ENGINE else f"-{engine}"


def engine_tag(tag: str, engine: str) -> str:
    """``tag`` ending in ``engine``'s suffix, added once (a tag that has it already is kept)."""
    suffix = engine_suffix(engine)
    return tag if tag.endswith(suffix) else f"{tag}{suffix}"


def engine_image(image: str, engine: str) -> str:
    """The local reference of ``engine``'s variant of ``image``: its tag (``latest`` when it names none)
    plus :func:`engine_suffix`. ``sd-lambda:local`` is the torch image, ``sd-lambda:local-openvino`` the
    OpenVINO one."""
    if not engine_suffix(engine) or "@" in image:  # a digest names one image already
        return image
    # A tag is the part after the last ':' of the last path segment (a registry host may carry a port).
    head, slash, last = image.rpartition("/")
    name, colon, tag = last.partition(":")
    return f"{head}{slash}{name}:{engine_tag(tag if colon else 'latest', engine)}"
