"""Sources: a local folder, and the hub through fakes of ``HfApi.model_info`` / ``snapshot_download``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors import safe_open

from sd_lambda.layout import (
    MANIFEST,
    ModelPaths,
    bf16_copy_files,
    install_release,
    sha256_file,
    verify_release,
)
from sd_lambda.seeding import sources
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.sources import (
    from_dir,
    from_hub,
    parse_model_ref,
    select_hub_files,
    with_bf16_copy,
)

from .conftest import make_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_from_dir_describes_every_file(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "m", "v1")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("x")
    (folder / MANIFEST).write_text("{}")  # an old manifest is not content
    release = from_dir(folder)
    assert sorted(release.files) == [
        "model_index.json",
        "unet/part0.safetensors",
        "unet/part1.safetensors",
        "unet/part2.safetensors",
    ]
    assert release.manifest.source == f"dir:{folder.resolve()}"
    # The default revision names the content: same files, same name; other files, other name.
    assert from_dir(folder).revision == release.revision
    assert from_dir(make_model(tmp_path / "other", "v2")).revision != release.revision


def test_with_bf16_copy_adds_the_copies_to_the_release_and_leaves_the_folder_alone(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    release = from_dir(folder)
    hashed: list[Path] = []
    monkeypatch.setattr(sources, "sha256_file", lambda path: hashed.append(path) or sha256_file(path))
    copied = with_bf16_copy(release, tmp_path / "work")
    added = sorted(set(copied.files) - set(release.files))
    # Only the copies are hashed; the stored files keep the entries from_dir made for them.
    assert sorted(hashed) == sorted(copied.files[path] for path in added)
    assert set(release.manifest.files) <= set(copied.manifest.files)
    assert added == [
        "text_encoder/model.bf16.safetensors",
        "unet/diffusion_pytorch_model.bf16.safetensors",
        "vae/diffusion_pytorch_model.bf16.safetensors",
    ]
    assert all(copied.files[path].is_relative_to(tmp_path / "work") for path in added)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert copied.revision == f"{release.revision}-bf16copy"
    assert copied.manifest.source == f"{release.manifest.source} + bf16 copy"
    entries = {entry.path: entry for entry in copied.manifest.files}
    for path in added:
        assert entries[path].size == copied.files[path].stat().st_size
        assert entries[path].sha256 == sha256_file(copied.files[path])
    # Installed as a release, it is what the engine loads on a bf16 host.
    paths = ModelPaths(tmp_path / "efs" / "m")
    staging = tmp_path / "staged"
    for path, local in copied.files.items():
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, staging / path)
    install_release(paths, copied.revision, staging)
    assert bf16_copy_files(paths.release(copied.revision)) is not None


def test_with_bf16_copy_refuses_sharded_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    stored = folder / "unet" / "diffusion_pytorch_model.safetensors"
    stored.rename(folder / "unet" / "diffusion_pytorch_model-00001-of-00001.safetensors")
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    with pytest.raises(SeedError, match=r"^--bf16-copy: unet/ needs exactly one unsharded weights file$"):
        with_bf16_copy(from_dir(folder), tmp_path / "work")


def test_from_dir_refuses_a_bf16_copy_unless_asked_to_write_it_again(
    tiny_model_with_bf16_copy: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_with_bf16_copy, folder)
    with pytest.raises(
        SeedError, match=r"holds a bf16 copy \(text_encoder/model\.bf16\.safetensors, .*--bf16-copy"
    ):
        from_dir(folder)
    # A stale copy (other weights than the ones beside it) is replaced by one written from them.
    stale = folder / "unet" / "diffusion_pytorch_model.bf16.safetensors"
    stale.write_bytes(b"stale")
    copied = with_bf16_copy(from_dir(folder, bf16_copy=True), tmp_path / "work")
    written = copied.files["unet/diffusion_pytorch_model.bf16.safetensors"]
    assert written.is_relative_to(tmp_path / "work")
    assert written.read_bytes() != b"stale"


def test_from_dir_refusals(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SeedError, match=r"not a diffusers pipeline: no model_index\.json"):
        from_dir(empty)
    pickled = make_model(tmp_path / "pickled", "v1")
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SeedError, match=r"pickle weights are refused .*unet/diffusion_pytorch_model\.bin"):
        from_dir(pickled)
    linked = make_model(tmp_path / "linked", "v1")
    (linked / "unet" / "extra.safetensors").symlink_to(linked / "unet" / "part0.safetensors")
    with pytest.raises(SeedError, match="symlinks are not allowed"):
        from_dir(linked)


def test_parse_model_ref() -> None:
    assert parse_model_ref("segmind/tiny-sd") == ("segmind/tiny-sd", None)
    assert parse_model_ref("segmind/tiny-sd@v1.0") == ("segmind/tiny-sd", "v1.0")
    with pytest.raises(SeedError, match="invalid hub model id"):
        parse_model_ref("../etc/passwd")


REPO_FILES = [
    "model_index.json",
    "v1-5-pruned.safetensors",  # a single-file checkpoint: never taken
    "v1-5-pruned.ckpt",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "text_encoder/config.json",
    "text_encoder/model-00001-of-00002.safetensors",
    "text_encoder/model-00002-of-00002.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/model-00001-of-00002.fp16.safetensors",
    "text_encoder/model-00002-of-00002.fp16.safetensors",
    "text_encoder/model.safetensors.index.fp16.json",
    "text_encoder/model.safetensors.fp16.index.json",  # the same index, legacy spelling: not taken
    # diffusers' and transformers' current spelling of a variant's shards (the variant before the shard)
    "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model.fp16-00001-of-00002.safetensors",
    "text_encoder_2/model.fp16-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.fp16.json",
    # the same fp16 shards in the legacy spelling too: diffusers takes the current one
    "text_encoder_2/model-00001-of-00003.fp16.safetensors",
    "text_encoder_2/model-00002-of-00003.fp16.safetensors",
    "text_encoder_2/model-00003-of-00003.fp16.safetensors",
    "text_encoder_2/model.safetensors.fp16.index.json",
    # legacy spelling only
    "vae/config.json",
    "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
    "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
    "vae/diffusion_pytorch_model.safetensors.index.json",
    "vae/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
    "vae/diffusion_pytorch_model-00002-of-00002.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors.fp16.index.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
    "safety_checker/model.safetensors",  # not a component of this model_index
]
COMPONENTS = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "unet", "vae"]


def test_select_plain_weights() -> None:
    chosen = select_hub_files(REPO_FILES, COMPONENTS, variant=None)
    assert chosen == {
        "model_index.json": "model_index.json",
        "unet/config.json": "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors": "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json": "text_encoder/config.json",
        "text_encoder/model-00001-of-00002.safetensors": "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors": "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json": "text_encoder/model.safetensors.index.json",
        "text_encoder_2/config.json": "text_encoder_2/config.json",
        "text_encoder_2/model-00001-of-00002.safetensors": "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors": "text_encoder_2/model-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.json": "text_encoder_2/model.safetensors.index.json",
        "tokenizer/vocab.json": "tokenizer/vocab.json",
        "tokenizer/merges.txt": "tokenizer/merges.txt",
        "scheduler/scheduler_config.json": "scheduler/scheduler_config.json",
        "vae/config.json": "vae/config.json",
        **{
            f"vae/{name}": f"vae/{name}"
            for name in (
                "diffusion_pytorch_model-00001-of-00002.safetensors",
                "diffusion_pytorch_model-00002-of-00002.safetensors",
                "diffusion_pytorch_model.safetensors.index.json",
            )
        },
    }


def test_select_variant_renames_to_plain_names() -> None:
    chosen = select_hub_files(REPO_FILES, COMPONENTS, variant="fp16")
    assert (
        chosen["unet/diffusion_pytorch_model.fp16.safetensors"] == "unet/diffusion_pytorch_model.safetensors"
    )
    assert "unet/diffusion_pytorch_model.safetensors" not in chosen
    assert chosen["text_encoder/model-00002-of-00002.fp16.safetensors"] == (
        "text_encoder/model-00002-of-00002.safetensors"
    )
    assert (
        chosen["text_encoder/model.safetensors.index.fp16.json"]
        == "text_encoder/model.safetensors.index.json"
    )
    second = {repo: release for repo, release in chosen.items() if repo.startswith("text_encoder_2/")}
    assert {repo.split("/")[1]: release.split("/")[1] for repo, release in second.items()} == {
        "config.json": "config.json",
        "model.fp16-00001-of-00002.safetensors": "model-00001-of-00002.safetensors",
        "model.fp16-00002-of-00002.safetensors": "model-00002-of-00002.safetensors",
        "model.safetensors.index.fp16.json": "model.safetensors.index.json",
    }
    vae = {repo: release for repo, release in chosen.items() if repo.startswith("vae/")}
    stem = "diffusion_pytorch_model"
    assert {repo.split("/")[1]: release.split("/")[1] for repo, release in vae.items()} == {
        "config.json": "config.json",
        f"{stem}-00001-of-00002.fp16.safetensors": f"{stem}-00001-of-00002.safetensors",
        f"{stem}-00002-of-00002.fp16.safetensors": f"{stem}-00002-of-00002.safetensors",
        f"{stem}.safetensors.fp16.index.json": f"{stem}.safetensors.index.json",
    }
    assert "text_encoder/model.safetensors.fp16.index.json" not in chosen
    assert len(set(chosen.values())) == len(chosen)


def test_a_legacy_variant_index_is_renamed_with_its_map(tmp_path: Path) -> None:
    stem = "diffusion_pytorch_model"
    legacy = f"vae/{stem}.safetensors.fp16.index.json"
    shards = {"a": f"{stem}-00001-of-00002.fp16.safetensors", "b": f"{stem}-00002-of-00002.fp16.safetensors"}
    (tmp_path / "vae").mkdir()
    (tmp_path / legacy).write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    local = sources._materialize(tmp_path, legacy, f"vae/{stem}.safetensors.index.json")
    assert json.loads(local.read_text())["weight_map"] == {
        "a": f"{stem}-00001-of-00002.safetensors",
        "b": f"{stem}-00002-of-00002.safetensors",
    }


def test_select_refuses_pickle_only_components() -> None:
    with pytest.raises(SeedError, match=r"vae/ has only pickle weights"):
        select_hub_files(
            ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.bin"], ["vae"], None
        )


class FakeHub:
    """What the hub would answer for a few repos; each is a local folder of files."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.downloads: list[tuple[str, str, list[str]]] = []

    def error(self, cls: type[Exception], repo: str) -> Exception:
        response = SimpleNamespace(headers={}, request=None, status_code=404)  # what the errors read
        return cls(f"404 Client Error for {repo}", response=response)

    def model_info(self, repo: str, revision: str | None = None) -> Any:
        if repo == "acme/gated":
            raise self.error(GatedRepoError, repo)
        if repo not in self.repos:
            raise self.error(RepositoryNotFoundError, repo)
        if revision not in (None, "main", COMMIT):
            raise self.error(RevisionNotFoundError, repo)
        files = sorted(
            p.relative_to(self.repos[repo]).as_posix() for p in self.repos[repo].rglob("*") if p.is_file()
        )
        return SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename=f) for f in files])

    def snapshot_download(
        self, repo: str, *, revision: str, allow_patterns: list[str], local_dir: Path
    ) -> str:
        self.downloads.append((repo, revision, allow_patterns))
        for name in allow_patterns:
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.repos[repo] / name, Path(local_dir) / name)
        return str(local_dir)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path) -> FakeHub:
    return install_fake_hub(monkeypatch, tiny_model_dir, tmp_path)


def install_fake_hub(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path) -> FakeHub:
    """``acme/tiny-sd`` (the tiny pipeline) and ``acme/taesd`` (its tiny decoder) behind a fake hub."""
    pipeline = tmp_path / "repo"
    shutil.copytree(tiny_model_dir, pipeline)
    decoder = pipeline / "vae_tiny"
    shutil.move(decoder, tmp_path / "taesd")
    # An fp16 variant of the unet, and a pickle copy that must never be downloaded.
    weights = pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copyfile(weights, pipeline / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    (pipeline / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    fake = FakeHub({"acme/tiny-sd": pipeline, "acme/taesd": tmp_path / "taesd"})
    monkeypatch.setattr(sources, "HfApi", lambda: fake)
    monkeypatch.setattr(sources, "snapshot_download", fake.snapshot_download)
    return fake


def test_from_hub_downloads_safetensors_only(hub: FakeHub, tmp_path: Path) -> None:
    release = from_hub("acme/tiny-sd", tmp_path / "work", tiny_decoder="acme/taesd")
    downloaded = {name for _, _, names in hub.downloads for name in names}
    assert not any(name.endswith(".bin") for name in downloaded)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in downloaded
    assert all(revision == COMMIT for _, revision, _ in hub.downloads)  # pinned to the resolved commit
    assert "vae_tiny/diffusion_pytorch_model.safetensors" in release.files
    assert release.revision == f"{COMMIT[:12]}-tiny{COMMIT[:7]}"
    assert release.manifest.source == f"hf://acme/tiny-sd@{COMMIT} + vae_tiny=hf://acme/taesd@{COMMIT}"

    # What was downloaded is a pipeline the layout accepts.
    staged = tmp_path / "staged"
    for path, local in release.files.items():
        (staged / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, staged / path)
    paths = ModelPaths(tmp_path / "efs" / "acme--tiny-sd")
    install_release(paths, release.revision, staged)
    assert verify_release(paths.resolve_current()).files == release.manifest.files


def test_from_hub_variant(hub: FakeHub, tmp_path: Path) -> None:
    release = from_hub("acme/tiny-sd@main", tmp_path / "work", variant="fp16")
    assert release.files["unet/diffusion_pytorch_model.safetensors"].name == (
        "diffusion_pytorch_model.fp16.safetensors"
    )
    assert release.revision == f"{COMMIT[:12]}-fp16"
    assert (
        json.loads(release.files["model_index.json"].read_text())["_class_name"] == "StableDiffusionPipeline"
    )


def test_from_hub_sharded_variant_loads_without_a_variant(hub: FakeHub, tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    # The text encoder as transformers shards it: fp32 shards and, beside them, fp16 variant shards.
    text_encoder = hub.repos["acme/tiny-sd"] / "text_encoder"
    model = CLIPTextModel.from_pretrained(text_encoder)
    (text_encoder / "model.safetensors").unlink()
    model.save_pretrained(text_encoder, max_shard_size="20KB")
    model.half().save_pretrained(text_encoder, max_shard_size="20KB", variant="fp16")
    assert list(text_encoder.glob("model.fp16-00001-of-0000?.safetensors"))  # the spelling under test

    release = from_hub("acme/tiny-sd", tmp_path / "work", variant="fp16")
    staged = tmp_path / "staged"
    for path, local in release.files.items():
        (staged / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, staged / path)
    shards = sorted(p.name for p in (staged / "text_encoder").glob("*.safetensors"))
    assert shards
    assert all(".fp16" not in name for name in shards)
    index = json.loads((staged / "text_encoder" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    # The fp16 shards were taken, and transformers loads them from the folder without a variant.
    for shard in shards:
        with safe_open(staged / "text_encoder" / shard, "pt") as weights:
            assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F16"}  # noqa: SIM118
    loaded = CLIPTextModel.from_pretrained(staged / "text_encoder", dtype=torch.float32)
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key].float())


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("acme/missing", "model acme/missing not found on the hub (private? set HF_TOKEN)"),
        ("acme/tiny-sd@nope", "revision 'nope' of acme/tiny-sd does not exist on the hub"),
        ("acme/gated", "model acme/gated is gated: accept its terms on the hub and set HF_TOKEN"),
    ],
)
def test_hub_errors_are_one_line(hub: FakeHub, tmp_path: Path, ref: str, message: str) -> None:
    with pytest.raises(SeedError) as caught:
        from_hub(ref, tmp_path / "work")
    assert str(caught.value) == message
    assert hub.downloads == []


def test_the_sources_import_only_declared_dependencies() -> None:
    """httpx2 is huggingface_hub's dependency, not ours: sources.py reaches its errors through the hub's
    own export (``huggingface_hub.utils.httpx``), so nothing it imports is undeclared (#21 item 18)."""
    import ast
    import re
    import sys
    import tomllib

    tree = ast.parse(Path(sources.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    tops = {name.split(".")[0] for name in imported} - {"sd_lambda"} - set(sys.stdlib_module_names)
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["ops"]
    declared = {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("-", "_") for spec in specs}
    assert tops
    assert tops <= declared, tops - declared
