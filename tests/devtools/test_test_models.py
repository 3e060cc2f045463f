import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from transformers import CLIPTokenizer

from sd_lambda.cli import main
from sd_lambda.devtools.testing.models import TOKENIZER_MAX_LENGTH, build_test_model, parameter_counts
from sd_lambda.layout import bf16_copy_files

EXPECTED_FOLDERS = {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "vae_tiny"}


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_tiny_model_has_diffusers_layout_with_safetensors_only(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {p.name for p in tiny_model_dir.iterdir() if p.is_dir()} >= EXPECTED_FOLDERS
    weights = [p for p in tiny_model_dir.rglob("*") if p.suffix in {".bin", ".safetensors", ".ckpt", ".pt"}]
    assert weights
    assert all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file()) < 2_000_000


def test_tiny_model_loads_and_generates_64x64(tiny_model_dir: Path) -> None:
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir, use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a red fox", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pil"
    ).images[0]
    assert image.size == (64, 64)
    assert image.mode == "RGB"


def test_tiny_decoder_matches_the_vae_latent_shape(tiny_model_dir: Path) -> None:
    decoder = AutoencoderTiny.from_pretrained(tiny_model_dir / "vae_tiny")
    with torch.inference_mode():
        image = decoder.decode(torch.randn(1, 4, 8, 8)).sample
    assert image.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("prompt", ["a red fox", "x" * 500, ""])
def test_tokenizer_pads_and_truncates_to_77(tiny_model_dir: Path, prompt: str) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    assert tokenizer.model_max_length == TOKENIZER_MAX_LENGTH
    ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    assert len(ids.input_ids) == TOKENIZER_MAX_LENGTH
    assert ids.input_ids[0] == tokenizer.bos_token_id


def test_tokenizer_is_byte_level_and_lossless(tiny_model_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    assert len(tokenizer) == 2 * 256 + 2
    ids = tokenizer("fox", add_special_tokens=False).input_ids
    assert len(ids) == 3  # one token per byte: no merges


def test_build_is_deterministic_from_seed(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_test_model(tmp_path / "again", "tiny", seed=0)
    other = build_test_model(tmp_path / "other", "tiny", seed=1)
    assert _digests(again) == _digests(tiny_model_dir)
    assert (
        _digests(other)["unet/diffusion_pytorch_model.safetensors"]
        != (_digests(again)["unet/diffusion_pytorch_model.safetensors"])
    )


def test_sd15_architecture_parameter_counts_without_allocating() -> None:
    counts = parameter_counts("sd15")
    # Stable Diffusion 1.5: 859.5M UNet, 83.7M VAE, 123.1M CLIP ViT-L/14 text encoder.
    assert counts["unet"] == 859_520_964
    assert counts["vae"] == 83_653_863
    assert counts["text_encoder"] == 123_060_480
    assert 2_000_000 < counts["vae_tiny"] < 3_000_000  # TAESD


def test_cli_dry_run_prints_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-test-model", "--dry", "--size", "sd15"]) == 0
    assert json.loads(capsys.readouterr().out)["unet"] == 859_520_964


def test_cli_refuses_non_empty_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["make-test-model", "-o", str(tmp_path)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_cli_builds_without_tiny_decoder(tmp_path: Path) -> None:
    assert main(["make-test-model", "-o", str(tmp_path / "m"), "--no-tiny-decoder"]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert not (tmp_path / "m" / "vae_tiny").exists()


def test_cli_writes_the_bf16_copy_on_request(tmp_path: Path) -> None:
    assert main(["make-test-model", "-o", str(tmp_path / "plain")]) == 0
    assert bf16_copy_files(tmp_path / "plain") is None
    assert main(["make-test-model", "-o", str(tmp_path / "copied"), "--bf16-copy"]) == 0
    copies = bf16_copy_files(tmp_path / "copied")
    assert copies is not None
    assert [path.parent.name for path in copies] == ["text_encoder", "unet", "vae"]
