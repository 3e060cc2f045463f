"""The weights' bf16 copy: written exactly, loaded only where bf16 runs (tiny model)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd_lambda.engine.accel.bf16_copy import add_bf16_copy, write_bf16_copy
from sd_lambda.engine.accel.upsample_fold import FoldedUpsample2D, fold_kernel
from sd_lambda.engine.torch_engine import Engine
from sd_lambda.layout import BF16_COPY_COMPONENTS, LayoutError, bf16_copy_files, plain_weights
from sd_lambda.settings import Settings

BF16 = Settings(dtype="bfloat16", accel="+bf16_copy")


@pytest.fixture
def copied_model(tiny_model_with_bf16_copy: Path) -> Path:
    return tiny_model_with_bf16_copy


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def test_the_copy_is_each_float_tensor_rounded_to_bf16_and_the_rest_as_stored(tmp_path: Path) -> None:
    stored = tmp_path / "model.safetensors"
    tensors = {"weight": torch.randn(3, 5), "half": torch.randn(4).half(), "ids": torch.arange(6)}
    save_file(tensors, stored, metadata={"format": "pt", "note": "kept"})
    copy = write_bf16_copy(stored)
    assert copy == tmp_path / "model.bf16.safetensors"
    written = _tensors(copy)
    assert written["weight"].dtype == written["half"].dtype == torch.bfloat16
    assert torch.equal(written["weight"], tensors["weight"].to(torch.bfloat16))
    assert torch.equal(written["half"], tensors["half"].to(torch.bfloat16))
    assert torch.equal(written["ids"], tensors["ids"])  # integers are not floats to round
    with safe_open(copy, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "kept"}
    assert not list(tmp_path.glob("*.partial"))


def test_add_bf16_copy_writes_what_is_missing_or_stale_and_nothing_else(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert bf16_copy_files(model) is None
    written = add_bf16_copy(model)
    assert sorted(path.parent.name for path in written) == sorted(BF16_COPY_COMPONENTS)
    assert bf16_copy_files(model) == [
        next((model / name).glob("*.bf16.safetensors")) for name in BF16_COPY_COMPONENTS
    ]
    assert add_bf16_copy(model) == []
    # A copy older than its weights (the weights were replaced) is written again.
    unet_copy = next((model / "unet").glob("*.bf16.safetensors"))
    weights_mtime = plain_weights(model / "unet")[0].stat().st_mtime
    os.utime(unet_copy, (weights_mtime - 60, weights_mtime - 60))
    assert add_bf16_copy(model) == [unet_copy]
    # The tiny decoder is not copied, and the stored files are still the only plain weights.
    assert not list((model / "vae_tiny").glob("*.bf16.safetensors"))
    assert all(len(plain_weights(model / name)) == 1 for name in BF16_COPY_COMPONENTS)


@pytest.mark.parametrize("shards", [1, 2])
def test_sharded_weights_get_no_copy(tiny_model_dir: Path, tmp_path: Path, shards: int) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    unet = model / "unet"
    stored = plain_weights(unet)[0]
    for index in range(1, shards + 1):
        shutil.copy(stored, unet / f"diffusion_pytorch_model-{index:05d}-of-{shards:05d}.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    stored.unlink()
    with pytest.raises(LayoutError, match=r"unet: a bf16 copy needs exactly one unsharded weights file"):
        add_bf16_copy(model)
    # Even a copy written by hand beside a single shard is not one the engine would load.
    first = f"diffusion_pytorch_model-00001-of-{shards:05d}"
    shutil.copy(unet / f"{first}.safetensors", unet / f"{first}.bf16.safetensors")
    assert bf16_copy_files(model) is None


def test_bf16_loads_the_copy_and_never_reads_the_stored_weights(copied_model: Path, tmp_path: Path) -> None:
    # Every stored weights file is garbage here: only a load that maps the copies can succeed.
    view = tmp_path / "view"
    shutil.copytree(copied_model, view)
    for name in BF16_COPY_COMPONENTS:
        plain_weights(view / name)[0].write_bytes(b"not safetensors")
    engine = Engine.load(view, BF16)
    assert engine.choices.weights == "bf16 copy"
    assert engine.describe()["weights"] == "bf16 copy"
    assert {p.dtype for p in engine.pipeline.unet.parameters()} == {torch.bfloat16}
    assert engine.pipeline.text_encoder.dtype == engine.pipeline.vae.dtype == torch.bfloat16
    with pytest.raises(Exception, match=r"header|safetensors|deserializ"):
        Engine.load(view, Settings(dtype="float32"))


def test_an_incomplete_copy_is_not_used(copied_model: Path, tmp_path: Path) -> None:
    view = tmp_path / "view"
    shutil.copytree(copied_model, view)
    next((view / "vae").glob("*.bf16.safetensors")).unlink()
    engine = Engine.load(view, BF16)
    assert engine.choices.weights == "stored"
    assert engine.pipeline.unet.dtype == torch.bfloat16  # cast at load, as without a copy


def test_the_copy_gives_the_weights_a_cast_at_load_would(copied_model: Path) -> None:
    from_copy = Engine.load(copied_model, BF16)
    cast = Engine.load(copied_model, Settings(dtype="bfloat16", accel="default"))
    assert cast.choices.weights == "stored"
    folded = {
        name
        for name, module in from_copy.pipeline.unet.named_modules()
        if isinstance(module, FoldedUpsample2D)
    }
    copied = from_copy.pipeline.unet.state_dict()
    compared = 0
    for name, tensor in cast.pipeline.unet.state_dict().items():
        if not any(name.startswith(prefix + ".") for prefix in folded):
            assert torch.equal(copied[name], tensor), name
            compared += 1
    assert compared > 100
    # Folded upsample kernels sum the taps of the rounded weights, in fp32, rounded once more; a cast at
    # load rounds the fp32 sum once. So they differ by at most the two final roundings (half a bf16 ulp,
    # up to 2^-8 relative, each) plus the four taps' roundings.
    cast_state = cast.pipeline.unet.state_dict()
    for prefix in folded:
        stock_weight = from_copy.pipeline.unet.get_submodule(prefix).stock_kernel[0]
        assert stock_weight.dtype == torch.bfloat16
        from_taps = copied[f"{prefix}.weight"].float()
        assert torch.equal(from_taps, fold_kernel(stock_weight.float()).to(torch.bfloat16).float())
        from_sum = cast_state[f"{prefix}.weight"].float()
        bound = 2**-7 * torch.maximum(from_taps.abs(), from_sum.abs()) + 4 * 2**-8 * stock_weight.abs().max()
        assert ((from_taps - from_sum).abs() <= bound).all()
        assert torch.equal(copied[f"{prefix}.bias"], cast_state[f"{prefix}.bias"])
    assert folded


def test_float32_keeps_loading_the_stored_weights_beside_a_copy(copied_model: Path) -> None:
    engine = Engine.load(copied_model, Settings(dtype="float32"))
    assert engine.choices.weights == "stored"
    assert engine.pipeline.unet.dtype == torch.float32
