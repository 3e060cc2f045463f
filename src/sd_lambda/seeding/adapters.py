"""LoRA adapters as releases: a local folder or a hub repo -> one checked safetensors file, uploaded and
synced like a model (``sd-lambda seed-lora``, ``make seed-lora``).

An adapter lives under the model it adapts, ``<model>/loras/<adapter>/`` on EFS, with the model's layout
(releases, manifest, atomic ``current``, lock; sd_lambda.layout), and under
``<prefix><model>/.loras/<adapter>/<revision>/`` in the bucket. Its release is one ``.safetensors`` file,
read by diffusers' ``load_lora_weights``; the file's header is checked here, with the standard library,
before anything touches AWS: a truncated file, or one without LoRA tensors, is refused in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sd_lambda.layout import LORA, PICKLE_SUFFIXES, check_name, lora_weights_problem
from sd_lambda.seeding.errors import SeedError
from sd_lambda.seeding.sources import Hub, LocalRelease, parse_model_ref

# diffusers' name for an adapter's weights: what its load_lora_weights reads first in a folder.
DEFAULT_WEIGHTS = "pytorch_lora_weights.safetensors"
# The LoRA tensor names of the formats diffusers converts (its own and PEFT's lora_A/lora_B, kohya's
# lora_down/lora_up, and the lora.down/lora.up of older diffusers attention processors).
LORA_KEY_MARKS = ("lora_a", "lora_b", "lora_down", "lora_up", "lora.down", "lora.up")
# A header bigger than this is not a LoRA's (safetensors itself caps headers at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter comes from: a local folder (``folder``) or a hub repo (``hub_ref``)."""

    folder: Path | None = None
    hub_ref: str | None = None

    @classmethod
    def parse(cls, value: str) -> AdapterSource:
        """A folder that exists is a folder; anything else must be a hub id ``owner/name[@rev]``."""
        path = Path(value).expanduser()
        if path.is_dir():
            return cls(folder=path)
        if path.exists():
            raise SeedError(f"{value} is a file: pass the folder that holds the adapter's .safetensors")
        parse_model_ref(value)
        return cls(hub_ref=value)

    def default_name(self) -> str:
        """The adapter's name when none is given: the folder's or the hub repo's name."""
        raw = self.folder.resolve().name if self.folder else parse_model_ref(str(self.hub_ref))[0]
        name = raw.rsplit("/", 1)[-1]
        try:
            return check_name(name, "adapter name")
        except Exception as exc:  # a folder name is not always a valid one: say how to choose another
            raise SeedError(f"{exc}; choose one with --lora-name") from None


def check_lora_weights(path: Path) -> int:
    """Check a LoRA safetensors file from its header alone; returns its number of tensors.

    The header is an 8-byte little-endian length and that much JSON (name -> dtype, shape, offsets); the
    offsets must end exactly at the end of the file, so a truncated download is caught here.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise SeedError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise SeedError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SeedError(f"{path}: not a safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise SeedError(f"{path}: not a safetensors file (header is not an object)")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    try:
        end = max((int(info["data_offsets"][1]) for info in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise SeedError(f"{path}: not a safetensors file (tensor offsets: {exc})") from None
    if 8 + length + end != size:
        raise SeedError(f"{path}: {size} bytes, but its header describes {8 + length + end} (truncated?)")
    if not any(mark in name.lower() for name in tensors for mark in LORA_KEY_MARKS):
        raise SeedError(
            f"{path}: no LoRA tensors (names with lora_A/lora_B or lora_down/lora_up): not a LoRA adapter"
        )
    return len(tensors)


def check_adapter_dir(folder: Path) -> dict[str, Path]:
    """The adapter release of a local folder: its one top-level ``.safetensors`` file, checked; pickles
    anywhere in the folder are refused rather than skipped, as for a model."""
    pickles = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise SeedError(
            f"{folder}: pickle weights are refused (convert them to safetensors): {', '.join(pickles)}"
        )
    names = [path.name for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")]
    problem = lora_weights_problem(names)
    if problem:
        raise SeedError(f"{folder}: {problem}")
    (weights,) = [folder / name for name in names if name.endswith(".safetensors")]
    if weights.is_symlink():
        raise SeedError(f"{weights}: symlinks are not allowed in an adapter folder")
    check_lora_weights(weights)
    return {weights.name: weights}


def choose_hub_weights(repo: str, filenames: list[str]) -> str:
    """The repo file that is the adapter: its one top-level ``.safetensors``, or diffusers' default name
    among several."""
    top = sorted(f for f in filenames if "/" not in f and f.endswith(".safetensors"))
    if len(top) == 1:
        return top[0]
    if DEFAULT_WEIGHTS in top:
        return DEFAULT_WEIGHTS
    if top:
        raise SeedError(
            f"{repo} has several .safetensors files ({', '.join(top)}): download the one you want into a "
            "folder and seed that folder"
        )
    pickles = [f for f in filenames if PurePosixPath(f).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise SeedError(f"{repo} has only pickle weights on the hub ({', '.join(pickles)}): refused")
    raise SeedError(f"{repo} has no top-level .safetensors file on the hub: not a LoRA adapter")


def from_hub(ref: str, work_dir: Path) -> LocalRelease:
    """Download a hub LoRA's weights file (nothing else) and check it."""
    repo, revision = parse_model_ref(ref)
    hub = Hub(repo, revision)
    commit, filenames = hub.info()
    weights = choose_hub_weights(repo, filenames)
    local_dir = Path(work_dir) / "hub" / repo.replace("/", "--") / commit
    hub.download(commit, [weights], local_dir)
    path = local_dir / weights
    if not path.is_file():
        raise SeedError(f"the hub download lacks {weights}")
    check_lora_weights(path)
    return LocalRelease.from_files(
        {weights: path}, source=f"hf://{repo}@{commit}", revision=commit[:12], kind=LORA
    )


def from_dir(folder: Path, checked: dict[str, Path] | None = None) -> LocalRelease:
    files = checked if checked is not None else check_adapter_dir(folder)
    return LocalRelease.from_files(files, source=f"dir:{Path(folder).resolve()}", kind=LORA)
