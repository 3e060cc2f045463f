"""Casting memory-mapped safetensors weights releases the source pages and keeps the values."""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sd_lambda.engine.accel.weights import cast_releasing_pages, file_mapped_ranges, release_mapped_pages


def test_cast_matches_a_plain_cast_and_drops_the_mapped_pages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.LayerNorm(1024))
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    mapped = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.LayerNorm(1024))
    mapped.load_state_dict(load_file(path), assign=True)
    assert file_mapped_ranges(), "safetensors should memory-map the file"

    released = cast_releasing_pages(mapped, torch.bfloat16)

    weight_bytes = 512 * 1024 * 4
    assert weight_bytes - 2 * mmap.PAGESIZE <= released <= sum(p.nbytes for p in reference.parameters())
    for (name, got), (_, want) in zip(
        mapped.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert got.dtype == torch.bfloat16, name
        assert torch.equal(got, want.to(torch.bfloat16)), name


def test_tensors_outside_mapped_files_are_cast_without_releasing() -> None:
    module = torch.nn.Linear(256, 256)
    expected = module.weight.detach().to(torch.bfloat16)
    assert cast_releasing_pages(module, torch.bfloat16) == 0
    assert torch.equal(module.weight, expected)
    assert cast_releasing_pages(module, torch.bfloat16) == 0  # already bf16: nothing to do


def test_maps_parser_reads_only_the_matching_files(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000100000 r--p 00000000 fe:00 12 /models/unet/diffusion_pytorch_model.safetensors\n"
        "7f0000200000-7f0000300000 r-xp 00000000 fe:00 13 /usr/lib/libc.so.6\n"
        "7f0000400000-7f0000500000 rw-p 00000000 00:00 0\n"
    )
    assert file_mapped_ranges(maps=maps) == [(0x7F0000000000, 0x7F0000100000)]
    assert file_mapped_ranges(maps=tmp_path / "missing") == []


def test_channels_last_relayout_in_the_same_copy(tmp_path: Path) -> None:
    conv = torch.nn.Conv2d(64, 128, 3)
    path = tmp_path / "conv.safetensors"
    save_file({k: v.contiguous() for k, v in conv.state_dict().items()}, path)
    expected = conv.weight.detach().clone()
    conv.load_state_dict(load_file(path), assign=True)
    assert cast_releasing_pages(conv, torch.float32, channels_last=True) > 0
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.dtype == torch.float32
    assert torch.equal(conv.weight, expected)
    assert conv.bias.dim() == 1  # not 4-d: left as it was


def test_replaced_tensors_have_their_mapped_pages_dropped_and_still_read_back(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    original = {"a": torch.randn(256, 1024), "b": torch.randn(8)}
    save_file(original, path)
    mapped = load_file(path)
    assert release_mapped_pages([mapped["a"]]) >= mapped["a"].nbytes - 2 * mmap.PAGESIZE
    assert release_mapped_pages([torch.randn(256, 1024)]) == 0  # not in a mapping: untouched
    assert torch.equal(mapped["a"], original["a"])  # dropped pages fault back in from the file


def test_only_whole_pages_inside_the_tensor_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    # Neighbours share pages at a's edges; a's interior is whole pages of its own.
    save_file({"a": torch.randn(3 * 1024 + 5), "b": torch.randn(16), "c": torch.randn(16)}, path)
    mapped = load_file(path)
    neighbours = ("b", "c")
    for name in neighbours:
        mapped[name].add_(100.0)  # a private (copy-on-write) page: dropping it would lose this write
    released = release_mapped_pages([mapped["a"]])
    assert 0 < released <= mapped["a"].nbytes
    assert released % mmap.PAGESIZE == 0
    for name in neighbours:
        assert bool((mapped[name] > 50).all()), name
    assert release_mapped_pages([mapped["b"]]) == 0  # smaller than a page: nothing whole to drop
