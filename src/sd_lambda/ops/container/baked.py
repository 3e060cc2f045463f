"""One verified release inside the Lambda image (``weights_source = "image"``): the image's own model.

The image holds the model in the same layout the function reads from EFS (``<root>/<name>/releases/<rev>``
with its manifest, and ``current`` pointing at it), under :data:`BAKED_ROOT`, and sets ``MODEL_ROOT`` and
``MODEL_NAME`` to it: the handler, the engines and the prefetch read it with no second code path.

The build has two steps, so the model-less image stays cached while the model changes: image/Dockerfile
builds the engine's image as ``<tag>-base``; image/Dockerfile.baked adds one layer with the release (its
build context is a folder that holds that release and nothing else) plus ``current``, verifies every file
against the manifest inside the image, and is tagged ``<tag>``. Everything that can be checked (the
folder, the release's engine, the 10 GB image limit) is checked before either build runs.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sd_lambda.layout import (
    MANIFEST,
    LayoutError,
    ModelPaths,
    check_name,
    model_slug,
    release_engine,
    verify_release,
    write_file_atomically,
)
from sd_lambda.ops.container.docker import Docker, DockerFailed
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.sources import LocalRelease, check_dir, from_dir

# Where the model lives inside the image; MODEL_ROOT points here (image/Dockerfile.baked).
BAKED_ROOT = PurePosixPath("/opt/models")
BAKED_DOCKERFILE = Path("image/Dockerfile.baked")
# "Container image code package size: 10 GB (maximum uncompressed image size, including all layers)"
# (https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html). GB here is GiB, as in
# Lambda's other storage quotas; the check below is against the base image's measured size plus the
# release's bytes, the two things the final image is made of.
LAMBDA_IMAGE_LIMIT_BYTES = 10 * 1024**3
# The image label that names the baked model (name@revision): push-image reads it so a baked image's
# remote tag never equals a model-less one's (ECR tags are immutable).
MODEL_LABEL = "io.github.sd-lambda.model"
# What a baked image's remote tag carries before the model's name: rollback of an image stack only
# considers images that hold a model (a model-less image there would fail every request).
BAKED_TAG_MARK = "-baked-"
BASE_SUFFIX = "-base"


class BakeError(Exception):
    """The model cannot go into the image; the message says what to do."""


@dataclass(frozen=True)
class BakedRelease:
    """The release to put in the image, under the model name the function will read."""

    name: str
    revision: str
    release: LocalRelease

    @property
    def engine(self) -> str:
        return release_engine(self.release.files)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.revision}"


def release_from_dir(model_dir: Path, name: str | None = None) -> BakedRelease:
    """The release a folder holds: an EFS-layout model folder (its ``current`` release, verified against
    its manifest), one release folder with a manifest (verified), or a plain diffusers folder (hashed
    now). Refuses what seeding refuses (pickles, other pipeline classes, symlinks)."""
    model_dir = model_dir.expanduser()
    paths = ModelPaths(model_dir)
    try:
        if paths.current.is_symlink():
            folder = paths.resolve_current()
            default_name, revision = model_dir.resolve().name, folder.name
        else:
            folder, default_name, revision = model_dir, model_dir.resolve().name, None
        seeded = (folder / MANIFEST).is_file()
        # A seeded release may hold the bf16 copy seeding wrote; its manifest vouches for it.
        files = check_dir(folder, bf16_copy=seeded)
        if seeded:
            # What was seeded is what goes in: every file is checked against the manifest it came with.
            manifest = verify_release(folder)
            listed = {entry.path for entry in manifest.files}
            if listed != set(files):
                extra = sorted(set(files) - listed) or sorted(listed - set(files))
                raise LayoutError(f"{folder} does not match its manifest: {', '.join(extra[:5])}")
            release = LocalRelease(files, manifest, check_name(revision or folder.name, "revision"))
        else:
            release = from_dir(folder, revision, checked=files)
        chosen = check_name(name, "model name") if name else model_slug(default_name)
    except (LayoutError, SeedError) as exc:
        raise BakeError(str(exc)) from None
    return BakedRelease(chosen, release.revision, release)


def check_fits(base_bytes: int, release: BakedRelease, limit: int = LAMBDA_IMAGE_LIMIT_BYTES) -> None:
    """Refuse a model the image limit cannot hold, before the second build copies it."""
    total = base_bytes + release.release.manifest.total_bytes
    if total > limit:
        raise BakeError(
            f"the image would be {_gib(total)} (base {_gib(base_bytes)} + model {_gib(total - base_bytes)}), "
            f'over Lambda\'s {_gib(limit)} image limit: keep the weights on EFS (weights_source = "efs") '
            "or bake a smaller model"
        )


def stage_context(release: BakedRelease, context: Path) -> Path:
    """A fresh build context holding ``models/<name>/releases/<revision>/`` (the release's files and
    its manifest) and nothing else. Files are hard-linked where possible (the same bytes, no copy).

    Lambda runs the image as a least-privileged user of its own, not the image's USER: every file must
    be readable by any user ("The default Lambda user must be able to read all the files required to run
    your function code", https://docs.aws.amazon.com/lambda/latest/dg/images-create.html). A source file
    that is not world-readable is copied and made so (its own mode is left alone)."""
    if context.exists():
        shutil.rmtree(context)
    folder = context / "models" / release.name / "releases" / release.revision
    for relative, source in release.release.files.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(target.parent, 0o755)
        if _world_readable(source):
            try:
                os.link(source, target)
                continue
            except OSError:  # another file system, or links not allowed: copy
                pass
        shutil.copyfile(source, target)
        os.chmod(target, 0o644)
    write_file_atomically(folder / MANIFEST, release.release.manifest.to_json().encode())
    os.chmod(folder / MANIFEST, 0o644)
    for directory in (context, context / "models", folder.parent.parent, folder.parent, folder):
        os.chmod(directory, 0o755)
    return context


def image_size(docker: Docker, image: str) -> int:
    """The uncompressed size of a local image: what its root file system holds, measured inside it (``du``;
    Lambda's limit counts the uncompressed image). ``docker image inspect``'s Size depends on the image
    store (compressed blobs only, or compressed plus unpacked, with containerd's), so it is the fallback
    for an image this machine cannot run (another platform without emulation)."""
    try:
        measured = docker(
            ["run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "du", image, "-sxb", "/"]
        )
        return int(measured.split()[0])
    except (DockerFailed, ValueError, IndexError):
        pass
    output = docker(["image", "inspect", "--format", "{{.Size}}", image]).strip()
    try:
        return int(output)
    except ValueError:
        raise BakeError(f"docker image inspect {image} reported no size ({output!r})") from None


def check_builder(docker: Docker) -> None:
    """Refuse a buildx builder that cannot see local images: the model's layer is built FROM the
    ``-base`` image just built, which only a builder with the docker driver finds (a docker-container
    builder pulls it from a registry instead, and fails)."""
    from sd_lambda.ops.container.docker import has_buildx

    if not has_buildx(docker):
        return  # the legacy builder builds in the daemon, next to its images
    try:
        described = docker(["buildx", "inspect"])
    except DockerFailed:
        return
    fields = dict(
        (key.strip(), value.strip())
        for key, sep, value in (line.partition(":") for line in described.splitlines())
        if sep and key.strip() in ("Name", "Driver")
    )
    driver = fields.get("Driver")
    if driver and driver != "docker":
        raise BakeError(
            f"the selected buildx builder {fields.get('Name', '?')} (driver {driver}) cannot build FROM a "
            "local image, which baking a model needs: select a docker-driver builder (docker buildx use "
            "default, or desktop-linux on Docker Desktop) and retry"
        )


def baked_model(docker: Docker, image: str) -> str | None:
    """``name@revision`` of the model baked into a local image, or None for a model-less image."""
    try:
        output = docker(
            ["image", "inspect", "--format", f'{{{{index .Config.Labels "{MODEL_LABEL}"}}}}', image]
        )
    except DockerFailed:
        return None
    value = output.strip()
    return value if value and value != "<no value>" else None


def model_tag(tag: str, model: str | None) -> str:
    """A remote tag that names the baked model too: ``<tag>-baked-<name>-<revision>`` within Docker's
    128-character tag limit (the revision, which tells two builds apart, is kept whole)."""
    if model is None:
        return tag
    name, _, revision = model.partition("@")
    suffix = f"-{revision}"
    room = 128 - len(tag) - len(BAKED_TAG_MARK) - len(suffix)
    if room < 1:
        raise BakeError(f"the tag {tag!r} leaves no room for the model's revision {revision!r}")
    return f"{tag}{BAKED_TAG_MARK}{name[:room]}{suffix}"


def is_baked_tag(tag: str) -> bool:
    return BAKED_TAG_MARK in tag


def _world_readable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IROTH)


def _gib(size: int) -> str:
    return f"{size / 1024**3:.1f} GiB"
