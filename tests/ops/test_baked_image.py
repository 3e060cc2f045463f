"""build-image with a model inside (weights_source = "image"): what goes into the image, what is refused,
and the real `make build-image MODEL_DIR=...` against a stand-in docker on PATH."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release

from sd_lambda.layout import MANIFEST, ModelPaths, verify_release
from sd_lambda.ops.container import baked
from sd_lambda.ops.container.baked import BakeError

ROOT = Path(__file__).resolve().parents[2]
BASE_SIZE = 1_300_000_000


@pytest.fixture
def efs_model(tmp_path: Path, tiny_model_dir: Path) -> ModelPaths:
    """The tiny model seeded as on EFS: <root>/<name>/releases/<rev> with its manifest, current -> it."""
    return seed_release(tmp_path / "efs", TEST_MODEL_NAME, TEST_REVISION, tiny_model_dir)


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


def test_an_efs_layout_folder_bakes_its_current_release_verified(efs_model: ModelPaths) -> None:
    release = baked.release_from_dir(efs_model.model_dir)
    assert (release.name, release.revision) == (TEST_MODEL_NAME, TEST_REVISION)
    seeded = verify_release(efs_model.resolve_current())
    assert release.release.manifest.files == seeded.files  # what was seeded goes in, not a rehash
    assert release.engine == "torch"


def test_a_corrupt_file_refuses_the_bake(efs_model: ModelPaths) -> None:
    weights = next(efs_model.resolve_current().glob("unet/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(BakeError, match=r"manifest mismatch .*unet/"):
        baked.release_from_dir(efs_model.model_dir)


def test_a_plain_diffusers_folder_is_hashed_and_named_by_its_folder(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    folder = tmp_path / "My Model"
    shutil.copytree(tiny_model_dir, folder)
    with pytest.raises(BakeError, match="name"):  # not a valid model folder name: say so, never guess
        baked.release_from_dir(folder)
    release = baked.release_from_dir(folder, name="my-model")
    assert release.name == "my-model"
    assert re.fullmatch(r"[0-9a-f]{12}", release.revision)
    assert set(release.release.files) == _files_under(tiny_model_dir) - {MANIFEST}


def test_pickle_weights_are_refused_as_seeding_refuses_them(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(BakeError, match="pickle weights are refused"):
        baked.release_from_dir(folder)


def test_the_context_holds_the_release_and_nothing_else(tmp_path: Path, efs_model: ModelPaths) -> None:
    (efs_model.model_dir / "releases" / "old").mkdir()  # other releases and the lock stay out
    for path in efs_model.resolve_current().rglob("*"):  # as the seeder leaves them on EFS (fix_ownership)
        path.chmod(0o755 if path.is_dir() else 0o644)
    release = baked.release_from_dir(efs_model.model_dir)
    context = baked.stage_context(release, tmp_path / "context")
    folder = context / "models" / TEST_MODEL_NAME / "releases" / TEST_REVISION
    assert _files_under(context) == {
        f"models/{TEST_MODEL_NAME}/releases/{TEST_REVISION}/{path}"
        for path in [*release.release.files, MANIFEST]
    }
    assert verify_release(folder).files == release.release.manifest.files
    for path in context.rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), path  # readable by Lambda's own user
    unet = next(folder.glob("unet/*.safetensors"))
    source = release.release.files[unet.relative_to(folder).as_posix()]
    assert unet.stat().st_ino == source.stat().st_ino  # linked, not copied


def test_a_file_only_its_owner_reads_is_copied_world_readable(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    private = folder / "model_index.json"
    private.chmod(0o600)
    release = baked.release_from_dir(folder)
    context = baked.stage_context(release, tmp_path / "context")
    staged = context / "models" / "model" / "releases" / release.revision / "model_index.json"
    assert staged.stat().st_mode & 0o777 == 0o644
    assert staged.stat().st_ino != private.stat().st_ino
    assert private.stat().st_mode & 0o777 == 0o600  # the source is left as it was


def test_the_image_limit_is_checked_with_the_base_image(efs_model: ModelPaths) -> None:
    release = baked.release_from_dir(efs_model.model_dir)
    size = release.release.manifest.total_bytes
    baked.check_fits(baked.LAMBDA_IMAGE_LIMIT_BYTES - size, release)
    with pytest.raises(BakeError, match=r"over Lambda's 10\.0 GiB image limit: keep the weights on EFS"):
        baked.check_fits(baked.LAMBDA_IMAGE_LIMIT_BYTES - size + 1, release)


def test_a_baked_tag_names_model_and_revision_within_ecr_limits() -> None:
    assert baked.model_tag("git-abc", None) == "git-abc"
    assert baked.model_tag("git-abc", "test--tiny-sd@r1") == "git-abc-baked-test--tiny-sd-r1"
    assert baked.is_baked_tag(baked.model_tag("git-abc-openvino", "m@r1"))
    assert not baked.is_baked_tag("git-abc-dirty-20261205T000000Z-openvino")
    long = baked.model_tag("git-" + "a" * 12, "n" * 128 + "@" + "f" * 12)
    assert len(long) == 128
    assert long.endswith("-" + "f" * 12)


def test_the_dockerfile_sets_the_root_and_label_the_code_reads() -> None:
    text = (ROOT / baked.BAKED_DOCKERFILE).read_text()
    assert f"MODEL_ROOT={baked.BAKED_ROOT}" in text
    assert f"COPY models/ {baked.BAKED_ROOT}/" in text
    assert f'LABEL {baked.MODEL_LABEL}="${{MODEL_NAME}}@${{MODEL_REVISION}}"' in text
    build_step = 'activate_baked_release(Path(sys.argv[1]), sys.argv[2])" "/opt/models/${MODEL_NAME}"'
    assert f'{build_step} "${{MODEL_REVISION}}"' in text


def test_the_handler_serves_the_baked_layout_through_the_real_runtime(
    tmp_path: Path, efs_model: ModelPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    """The build context plus what the image's build runs on it (current, verification) is a model root
    the real entrypoint serves from, through the local Lambda Runtime API: only the root differs."""
    from sd_lambda.cli import main
    from sd_lambda.layout import activate_baked_release

    release = baked.release_from_dir(efs_model.model_dir)
    context = baked.stage_context(release, tmp_path / "context")
    model_dir = context / "models" / TEST_MODEL_NAME
    activate_baked_release(model_dir, TEST_REVISION)
    out = tmp_path / "baked.png"
    argv = ["demo", "--model-dir", str(model_dir), "--cache-dir", str(tmp_path / "cache"), "-o", str(out)]
    assert main([*argv, "--steps", "1"]) == 0
    assert f"current -> {TEST_REVISION}" in capsys.readouterr().out
    assert out.read_bytes().startswith(b"\x89PNG")


def test_the_images_build_step_refuses_a_file_its_manifest_does_not_vouch_for(
    tmp_path: Path, efs_model: ModelPaths
) -> None:
    from sd_lambda.layout import LayoutError, activate_baked_release

    context = baked.stage_context(baked.release_from_dir(efs_model.model_dir), tmp_path / "context")
    model_dir = context / "models" / TEST_MODEL_NAME
    config = model_dir / "releases" / TEST_REVISION / "scheduler" / "scheduler_config.json"
    config.unlink()
    config.write_text("{}")
    with pytest.raises(LayoutError, match=r"scheduler/scheduler_config\.json"):
        activate_baked_release(model_dir, TEST_REVISION)


# ---- the real make target against a stand-in docker -------------------------------------------------

STAND_IN = """#!{python}
import json, os, pathlib, sys
args = sys.argv[1:]
log = pathlib.Path(os.environ["DOCKER_LOG"])
entry = {{"args": args}}
if args[:1] == ["build"]:
    context = pathlib.Path(args[-1])
    entry["context"] = sorted(
        str(p.relative_to(context)) for p in context.rglob("*") if not p.is_dir()
    )
with log.open("a") as handle:
    handle.write(json.dumps(entry) + "\\n")
if args[:2] == ["buildx", "version"]:
    sys.exit("'buildx' is not a docker command")  # the legacy builder then
if args[:2] == ["image", "inspect"]:
    print({size})
if args[:1] == ["run"]:  # du inside the base image
    print("{size}\t/")
"""


def _make_build_image(
    tmp_path: Path, *variables: str, base_size: int = BASE_SIZE
) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(STAND_IN.format(python=sys.executable, size=base_size))
    docker.chmod(0o755)
    log = tmp_path / "docker.log"
    completed = subprocess.run(
        ["make", "-s", "--no-print-directory", "build-image", *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "MAKEFLAGS": "",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "DOCKER_LOG": str(log),
            "HOME": str(tmp_path / "home"),
        },
        check=False,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return completed, calls


def test_make_build_image_bakes_the_verified_release(tmp_path: Path, efs_model: ModelPaths) -> None:
    completed, calls = _make_build_image(tmp_path, f"MODEL_DIR={efs_model.model_dir}", "IMAGE=sd:test")
    assert completed.returncode == 0, completed.stderr
    builds = [call for call in calls if call["args"][0] == "build"]
    assert len(builds) == 2
    base, model = builds
    assert base["args"][base["args"].index("--tag") + 1] == "sd:test-base"
    assert base["args"][base["args"].index("--file") + 1] == "image/Dockerfile"
    assert model["args"][model["args"].index("--tag") + 1] == "sd:test"
    assert model["args"][model["args"].index("--file") + 1] == "image/Dockerfile.baked"
    build_args = [model["args"][i + 1] for i, arg in enumerate(model["args"]) if arg == "--build-arg"]
    assert build_args == [
        "BASE_IMAGE=sd:test-base",
        f"MODEL_NAME={TEST_MODEL_NAME}",
        f"MODEL_REVISION={TEST_REVISION}",
    ]
    release = verify_release(efs_model.resolve_current())
    prefix = f"models/{TEST_MODEL_NAME}/releases/{TEST_REVISION}/"
    assert model["context"] == sorted(prefix + path for path in [*(e.path for e in release.files), MANIFEST])
    assert not (tmp_path / "home" / ".cache" / "sd-lambda" / "baked-image-context").exists()  # cleaned up
    assert f"model {TEST_MODEL_NAME}@{TEST_REVISION} inside" in completed.stdout


def test_make_build_image_refuses_a_corrupt_release_before_building(
    tmp_path: Path, efs_model: ModelPaths
) -> None:
    config = efs_model.resolve_current() / "unet" / "config.json"
    config.write_text(config.read_text() + " ")
    completed, calls = _make_build_image(tmp_path, f"MODEL_DIR={efs_model.model_dir}")
    assert completed.returncode != 0
    ours = [line for line in completed.stderr.splitlines() if line.startswith("sd-lambda")]
    assert len(ours) == 1
    assert "manifest mismatch" in ours[0]
    assert "unet/config.json" in ours[0]
    assert not [call for call in calls if call["args"][0] == "build"]


def test_make_build_image_refuses_a_release_for_the_other_engine(
    tmp_path: Path, efs_model: ModelPaths
) -> None:
    completed, calls = _make_build_image(tmp_path, f"MODEL_DIR={efs_model.model_dir}", "ENGINE=openvino")
    assert completed.returncode != 0
    ours = [line for line in completed.stderr.splitlines() if line.startswith("sd-lambda")]
    assert ours == [
        f"sd-lambda build-image: error: {TEST_MODEL_NAME}@{TEST_REVISION} is a release for the torch engine: "
        "build it with ENGINE=torch"
    ]
    assert not calls


def test_make_build_image_refuses_a_base_image_the_model_would_push_past_the_limit(
    tmp_path: Path, efs_model: ModelPaths
) -> None:
    completed, calls = _make_build_image(
        tmp_path, f"MODEL_DIR={efs_model.model_dir}", base_size=baked.LAMBDA_IMAGE_LIMIT_BYTES
    )
    assert completed.returncode != 0
    assert "over Lambda's 10.0 GiB image limit" in completed.stderr
    assert len([call for call in calls if call["args"][0] == "build"]) == 1  # the base only


def test_name_without_a_model_is_refused(tmp_path: Path) -> None:
    completed, calls = _make_build_image(tmp_path, "NAME=x")
    assert completed.returncode != 0
    assert "NAME= names a baked model: add MODEL_DIR= or MODEL=" in completed.stderr
    assert not calls


class ScriptedDocker:
    """Answers each docker command from a table (command prefix -> output, or an exception)."""

    def __init__(self, answers: dict[tuple[str, ...], object]) -> None:
        self.answers, self.calls = answers, []

    def __call__(self, args, *, stdin=None, env=None):  # type: ignore[no-untyped-def]
        self.calls.append(list(args))
        for prefix, answer in self.answers.items():
            if tuple(args[: len(prefix)]) == prefix:
                if isinstance(answer, Exception):
                    raise answer
                return answer
        return ""


def test_the_size_is_measured_inside_the_image_and_inspect_is_the_fallback() -> None:
    from sd_lambda.ops.container.docker import DockerFailed

    measured = ScriptedDocker({("run",): "1300000000\t/\n", ("image", "inspect"): "400000000\n"})
    assert baked.image_size(measured, "sd:test-base") == 1_300_000_000
    assert measured.calls[0][-3:] == ["sd:test-base", "-sxb", "/"]
    cannot_run = ScriptedDocker({("run",): DockerFailed("exec format error"), ("image", "inspect"): "4\n"})
    assert baked.image_size(cannot_run, "sd:test-base") == 4


@pytest.mark.parametrize(
    ("driver", "refused"), [("docker", False), ("docker-container", True)], ids=["docker", "container"]
)
def test_a_builder_that_cannot_see_local_images_is_refused(driver: str, refused: bool) -> None:
    docker = ScriptedDocker({("buildx", "inspect"): f"Name:          multi\nDriver:        {driver}\n"})
    if refused:
        with pytest.raises(BakeError, match=r"builder multi \(driver docker-container\) cannot build FROM"):
            baked.check_builder(docker)
    else:
        baked.check_builder(docker)
