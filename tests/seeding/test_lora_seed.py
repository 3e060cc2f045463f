"""LoRA adapters seeded like models: the seeder's program (the shipped zip, Python 3.9, a local S3 and a
temp "EFS"), the driver's checks, and ``sd-lambda seed-lora`` end to end against a local AWS."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import boto3
import pytest
from helpers import TEST_MODEL_NAME, TEST_REVISION, seed_release

from sd_lambda.cli import FROM_MAKE_ENV, MAKE_VARIABLES, main
from sd_lambda.devtools.testing.models import build_test_lora
from sd_lambda.layout import LORA, LayoutError, Manifest, ModelPaths, verify_release
from sd_lambda.seeding import adapters
from sd_lambda.seeding.errors import SeedError

from .conftest import REGION, Bucket, LocalAgent, Outcome, SeederProgram

ADAPTER = "pixel-art"


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lora") / ADAPTER
    build_test_lora(folder, tiny_model_dir)
    return folder


def put_adapter(bucket: Bucket, folder: Path, model: str, adapter: str, revision: str) -> str:
    """Upload ``folder`` and its manifest where the driver puts an adapter; returns the manifest's sha256."""
    manifest = Manifest.build(folder, source=str(folder))
    prefix = f"models/{model}/.loras/{adapter}/{revision}/"
    for entry in manifest.files:
        bucket.client.upload_file(str(folder / entry.path), bucket.name, prefix + entry.path)
    return bucket.put_manifest(prefix, manifest.to_json())


def run(seeder: SeederProgram, *argv: str) -> Outcome:
    done = subprocess.run(
        [seeder.python, str(seeder.program), *argv],
        env=seeder.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def sync_adapter(seeder: SeederProgram, model: str, adapter: str, revision: str, *extra: str) -> Outcome:
    return run(
        seeder,
        "sync",
        "--mount", str(seeder.mount),
        "--name", model,
        "--adapter", adapter,
        "--revision", revision,
        "--bucket", seeder.bucket,
        "--s3-prefix", f"models/{model}/.loras/{adapter}/{revision}/",
        "--owner", f"{os.getuid()}:{os.getgid()}",
        *extra,
    )  # fmt: skip


# --- the seeder's program ------------------------------------------------------------------------------


def test_an_adapter_syncs_under_its_model_with_the_model_layout(
    seeder: SeederProgram, bucket: Bucket, lora_dir: Path, tiny_model_dir: Path
) -> None:
    model = seed_release(seeder.mount, TEST_MODEL_NAME, TEST_REVISION, tiny_model_dir)
    sha = put_adapter(bucket, lora_dir, TEST_MODEL_NAME, ADAPTER, "a1")
    outcome = sync_adapter(seeder, TEST_MODEL_NAME, ADAPTER, "a1", "--manifest-sha256", sha)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.result["adapter"] == ADAPTER
    assert outcome.result["revision"] == "a1"
    paths = model.adapter(ADAPTER)
    assert paths.model_dir == seeder.mount / TEST_MODEL_NAME / "loras" / ADAPTER
    assert os.readlink(paths.current) == "releases/a1"
    release = paths.resolve_current()
    assert {e.path for e in verify_release(release, sha, LORA).files} == {"pytorch_lora_weights.safetensors"}
    assert model.adapter_names() == [ADAPTER]
    assert model.revisions() == [TEST_REVISION]  # the model's own releases are untouched
    assert model.current_revision() == TEST_REVISION

    checked = run(seeder, "check-model", "--mount", str(seeder.mount), "--name", TEST_MODEL_NAME)
    assert checked.returncode == 0, checked.stderr
    assert checked.result == {"model": TEST_MODEL_NAME, "revision": TEST_REVISION, "adapters": [ADAPTER]}

    # A second revision, then a rollback: the same verified, atomic switch as a model's.
    (lora_dir.parent / "v2").mkdir(exist_ok=True)
    v2 = build_test_lora(lora_dir.parent / "v2", tiny_model_dir, seed=1).parent
    put_adapter(bucket, v2, TEST_MODEL_NAME, ADAPTER, "a2")
    assert sync_adapter(seeder, TEST_MODEL_NAME, ADAPTER, "a2").returncode == 0
    assert paths.current_revision() == "a2"
    back = run(
        seeder, "rollback", "--mount", str(seeder.mount), "--name", TEST_MODEL_NAME,
        "--adapter", ADAPTER, "--revision", "a1",
    )  # fmt: skip
    assert back.returncode == 0, back.stderr
    assert (back.result["previous"], paths.current_revision()) == ("a2", "a1")


def test_an_adapter_for_a_model_that_is_not_seeded_creates_nothing(
    seeder: SeederProgram, bucket: Bucket, lora_dir: Path
) -> None:
    put_adapter(bucket, lora_dir, TEST_MODEL_NAME, ADAPTER, "a1")
    outcome = sync_adapter(seeder, TEST_MODEL_NAME, ADAPTER, "a1")
    assert outcome.returncode == 1
    (error,) = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert "model not seeded" in error
    assert "seed the model first" in error
    assert list(seeder.mount.iterdir()) == []
    checked = run(seeder, "check-model", "--mount", str(seeder.mount), "--name", TEST_MODEL_NAME)
    assert checked.returncode == 1
    assert "model not seeded" in checked.stderr


def test_an_adapter_manifest_without_safetensors_is_refused_before_any_download(
    seeder: SeederProgram, bucket: Bucket, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = seed_release(seeder.mount, TEST_MODEL_NAME, TEST_REVISION, tiny_model_dir)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("no weights here")
    put_adapter(bucket, folder, TEST_MODEL_NAME, ADAPTER, "a1")
    outcome = sync_adapter(seeder, TEST_MODEL_NAME, ADAPTER, "a1")
    assert outcome.returncode == 1
    assert "does not describe a lora release: no .safetensors weights" in outcome.stderr
    assert not model.adapter(ADAPTER).staging("a1").exists()
    assert model.adapter_names() == []


def test_a_model_manifest_is_not_an_adapter_and_an_adapter_is_not_a_model(
    tmp_path: Path, lora_dir: Path
) -> None:
    """The layout checks what a release of each kind must hold, at verification as at the switch."""
    release = tmp_path / "release"
    release.mkdir()
    weights = release / "pytorch_lora_weights.safetensors"
    weights.write_bytes((lora_dir / weights.name).read_bytes())
    (release / "manifest.json").write_text(Manifest.build(release, "test").to_json())
    assert verify_release(release, kind=LORA).files[0].path == weights.name
    with pytest.raises(LayoutError, match=r"model_index\.json: missing"):
        verify_release(release)
    (release / "second.safetensors").write_bytes(weights.read_bytes())
    (release / "manifest.json").write_text(Manifest.build(release, "test").to_json())
    with pytest.raises(LayoutError, match=r"more than one \.safetensors file"):
        verify_release(release, kind=LORA)


# --- the driver's local checks ----------------------------------------------------------------------------


def test_a_lora_folder_is_checked_from_its_header(lora_dir: Path, tmp_path: Path) -> None:
    files = adapters.check_adapter_dir(lora_dir)
    assert list(files) == ["pytorch_lora_weights.safetensors"]
    data = files["pytorch_lora_weights.safetensors"].read_bytes()

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "style.safetensors").write_bytes(data[:-100])
    with pytest.raises(SeedError, match=r"truncated\?"):
        adapters.check_adapter_dir(truncated)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "style.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(SeedError, match="not a safetensors file"):
        adapters.check_adapter_dir(garbage)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "style.safetensors").write_bytes(data)
    (pickled / "extra.ckpt").write_bytes(b"pickle")
    with pytest.raises(SeedError, match=r"pickle weights are refused .*extra\.ckpt"):
        adapters.check_adapter_dir(pickled)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SeedError, match=r"no \.safetensors weights"):
        adapters.check_adapter_dir(empty)


def test_a_safetensors_file_without_lora_tensors_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "not-a-lora"
    folder.mkdir()
    unet = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    (folder / "model.safetensors").write_bytes(unet.read_bytes())
    with pytest.raises(SeedError, match="no LoRA tensors"):
        adapters.check_adapter_dir(folder)


@pytest.mark.parametrize(
    ("files", "chosen"),
    [
        (["README.md", "style.safetensors"], "style.safetensors"),
        (
            ["a.safetensors", "pytorch_lora_weights.safetensors", "x/b.safetensors"],
            "pytorch_lora_weights.safetensors",
        ),
    ],
)
def test_the_hub_file_taken_is_the_one_diffusers_would_read(files: list[str], chosen: str) -> None:
    assert adapters.choose_hub_weights("acme/style", files) == chosen


@pytest.mark.parametrize(
    ("files", "refusal"),
    [
        (["a.safetensors", "b.safetensors"], "several .safetensors files"),
        (["pytorch_lora_weights.bin"], "only pickle weights"),
        (["README.md", "sub/a.safetensors"], "no top-level .safetensors"),
    ],
)
def test_a_hub_repo_without_one_clear_weights_file_is_refused(files: list[str], refusal: str) -> None:
    with pytest.raises(SeedError, match=refusal):
        adapters.choose_hub_weights("acme/style", files)


def test_the_source_is_a_folder_when_one_exists_else_a_hub_id(lora_dir: Path) -> None:
    assert adapters.AdapterSource.parse(str(lora_dir)).folder == lora_dir
    assert adapters.AdapterSource.parse(str(lora_dir)).default_name() == ADAPTER
    hub = adapters.AdapterSource.parse("acme/pixel-style@v1")
    assert (hub.hub_ref, hub.default_name()) == ("acme/pixel-style@v1", "pixel-style")
    with pytest.raises(SeedError, match="invalid hub model id"):
        adapters.AdapterSource.parse("not a folder or an id")


def test_a_folder_without_safetensors_is_one_line_before_aws(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "style"
    folder.mkdir()
    (folder / "style.bin").write_bytes(b"pickle")
    # No stack and no credentials: the refusal comes first.
    assert main(["seed-lora", "--lora", str(folder), "--infra", str(tmp_path / "no-infra")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sd-lambda seed-lora: error: ")
    assert "pickle weights are refused" in line


# --- the driver end to end (moto's S3, EC2, IAM and SSM; a stand-in agent runs the commands) --------------


def _lora_keys(seeder: SeederProgram) -> list[str]:
    listed = boto3.client("s3", region_name=REGION).list_objects_v2(Bucket=seeder.bucket, Prefix="models/")
    return [item["Key"] for item in listed.get("Contents", []) if "/.loras/" in item["Key"]]


def test_seed_lora_end_to_end(
    local_aws: tuple[LocalAgent, list[str]],
    seeder: SeederProgram,
    lora_dir: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent, stack = local_aws
    seed = [
        "seed-lora",
        "--lora",
        str(lora_dir),
        "--name",
        TEST_MODEL_NAME,
        "--revision",
        "a1",
        "--no-progress",
    ]

    # 1. the model is not seeded: refused on the seeder before anything is uploaded or created.
    assert main([*seed, *stack]) == 1
    err = capsys.readouterr().err
    assert "model not seeded" in err
    assert _lora_keys(seeder) == []
    assert not (seeder.mount / TEST_MODEL_NAME).exists()

    # 2. with the model seeded: uploaded under .loras/, synced, switched, the seeder stopped again.
    model = seed_release(seeder.mount, TEST_MODEL_NAME, TEST_REVISION, tiny_model_dir)
    assert main([*seed, *stack, "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert (result["model"], result["adapter"], result["revision"], result["current"]) == (
        TEST_MODEL_NAME,
        ADAPTER,
        "a1",
        "a1",
    )
    assert result["downloaded_bytes"] == result["total_bytes"] > 0
    assert _lora_keys(seeder) == [
        f"models/{TEST_MODEL_NAME}/.loras/{ADAPTER}/a1/manifest.json",
        f"models/{TEST_MODEL_NAME}/.loras/{ADAPTER}/a1/pytorch_lora_weights.safetensors",
    ]
    paths = model.adapter(ADAPTER)
    assert paths.current_revision() == "a1"
    verify_release(paths.resolve_current(), kind=LORA)
    readable = [model.loras, paths.model_dir, paths.releases, *paths.release("a1").rglob("*")]
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in readable}
    assert owners == {(1000, 1000)}  # the Lambda's user reads them
    state = boto3.client("ec2", region_name=REGION).describe_instances(InstanceIds=[agent.instance_id])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] in {"stopping", "stopped"}
    assert ModelPaths(seeder.mount / TEST_MODEL_NAME).current_revision() == TEST_REVISION

    # 3. a second revision, then make rollback LORA_NAME=: the adapter goes back, the model stays.
    v2 = build_test_lora(lora_dir.parent / "v2" / ADAPTER, tiny_model_dir, seed=1).parent
    again = ["seed-lora", "--lora", str(v2), "--name", TEST_MODEL_NAME, "--revision", "a2", "--no-progress"]
    assert main([*again, *stack]) == 0, capsys.readouterr().err
    assert paths.current_revision() == "a2"
    capsys.readouterr()
    back = ["rollback", "--name", TEST_MODEL_NAME, "--lora-name", ADAPTER, "--revision", "a1", *stack]
    assert main([*back, "--json"]) == 0, capsys.readouterr().err
    rolled = json.loads(capsys.readouterr().out)
    assert (rolled["adapter"], rolled["previous"], rolled["current"]) == (ADAPTER, "a2", "a1")
    assert paths.current_revision() == "a1"
    assert model.current_revision() == TEST_REVISION


# --- make seed-lora -----------------------------------------------------------------------------------------


def _dry_run(*assignments: str) -> list[str]:
    """The words of the ``sd-lambda`` command ``make -n seed-lora`` would run."""
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", "seed-lora", *assignments],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [line for line in done.stdout.replace("\\\n", " ").splitlines() if "bin/sd-lambda " in line]
    return shlex.split(line)


def test_make_seed_lora_passes_each_variable_to_its_flag() -> None:
    words = _dry_run(
        "LORA=acme/pixel-art@v1",
        "MODEL=segmind/tiny-sd",
        "LORA_NAME=pixel",
        "REVISION=a1",
        "REGION=eu-west-1",
    )
    assert words[:3] == [f"{FROM_MAKE_ENV}=1", ".venv/bin/sd-lambda", "seed-lora"]
    values = {
        flag: words[words.index(flag) + 1] for flag in ("--lora", "--name", "--lora-name", "--revision")
    }
    assert values == {
        "--lora": "acme/pixel-art@v1",
        "--name": "segmind/tiny-sd",
        "--lora-name": "pixel",
        "--revision": "a1",
    }
    assert MAKE_VARIABLES["--lora"] == "LORA"
    assert MAKE_VARIABLES["--lora-name"] == "LORA_NAME"
    assert "--not-served" in _dry_run("LORA=x", "NOT_SERVED=1")
    rollback = subprocess.run(
        ["make", "-n", "--no-print-directory", "rollback", "REVISION=a1", "LORA_NAME=pixel"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    assert "--lora-name pixel" in " ".join(shlex.split(rollback))
    bare = _dry_run("LORA=./folder")
    assert "--name" not in bare
    assert "--not-served" not in bare
