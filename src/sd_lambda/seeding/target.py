"""Where seeding goes: the bucket, the seeder instance and its mount, from flags or the stack's outputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_lambda.cli import ask_for, option
from sd_lambda.layout import model_slug
from sd_lambda.seeding.errors import SeedError

DEFAULT_PREFIX = "models/"
# Under a model's key prefix, its LoRA adapters' uploads (on EFS they live in <name>/loras/).
ADAPTER_FOLDER = ".loras"
DEFAULT_MOUNT_PATH = "/mnt/models"

# Target field -> (root output of the stack, command-line flag).
OUTPUTS: dict[str, tuple[str, str]] = {
    "bucket": ("weights_bucket_name", "--bucket"),
    "prefix": ("weights_prefix", "--prefix"),
    "instance_id": ("seeder_instance_id", "--instance-id"),
    "mount_path": ("seeder_mount_path", "--mount-path"),
    "region": ("region", "--region"),
    "model_name": ("model_name", "--name"),
    "function_name": ("function_name", "--function-name"),
}
REQUIRED = ("bucket", "instance_id")


@dataclass(frozen=True)
class Target:
    bucket: str
    instance_id: str
    prefix: str = DEFAULT_PREFIX
    mount_path: str = DEFAULT_MOUNT_PATH
    region: str | None = None
    model_name: str | None = None  # the model folder the function serves
    function_name: str | None = None  # for --warm

    @property
    def key_prefix(self) -> str:
        """The weights prefix as keys start with it (``models/``; empty for the bucket's root)."""
        return f"{self.prefix.rstrip('/')}/" if self.prefix.strip("/") else ""

    def revision_prefix(self, name: str, revision: str) -> str:
        return f"{self.key_prefix}{name}/{revision}/"

    def adapter_prefix(self, name: str, adapter: str, revision: str) -> str:
        """Where model ``name``'s LoRA adapter revisions are uploaded: ``.loras`` starts with a dot, so
        it is never one of the model's revision names (layout.check_name)."""
        return f"{self.key_prefix}{name}/{ADAPTER_FOLDER}/{adapter}/{revision}/"


def _read_outputs(infra_dir: Path) -> dict[str, Any]:
    from sd_lambda.ops.stack_outputs import read_outputs

    return read_outputs(infra_dir)


def resolve_target(
    flags: Mapping[str, str | None],
    infra_dir: Path,
    read_outputs: Callable[[Path], Mapping[str, Any]] = _read_outputs,
) -> Target:
    """Flags win; the stack's outputs (``terraform output``) fill the rest, read only when needed."""
    values = {name: flags.get(name) for name in OUTPUTS}
    if any(values[name] is None for name in REQUIRED):
        try:
            outputs = read_outputs(infra_dir)
        except Exception as exc:  # any reason terraform can't tell us: say which flags replace it
            flags_needed = " ".join(OUTPUTS[name][1] for name in REQUIRED if values[name] is None)
            raise SeedError(f"cannot read the stack's outputs ({exc}); pass {flags_needed}") from exc
        for name, (output, _) in OUTPUTS.items():
            if values[name] is None and outputs.get(output) not in (None, ""):
                values[name] = str(outputs[output])
    missing = [OUTPUTS[name][1] for name in REQUIRED if not values[name]]
    if missing:
        raise SeedError(f"the stack has no seeder/bucket outputs (create = false?): pass {' '.join(missing)}")
    return Target(
        bucket=str(values["bucket"]),
        instance_id=str(values["instance_id"]),
        prefix=values["prefix"] or DEFAULT_PREFIX,
        mount_path=values["mount_path"] or DEFAULT_MOUNT_PATH,
        region=values["region"],
        model_name=values["model_name"],
        function_name=values["function_name"],
    )


def seed_name(
    target: Target,
    explicit: str | None,
    source_name: str | None,
    *,
    not_served: bool,
    command: str = "seed",
) -> str:
    """The EFS folder a seed writes: the model the stack's function serves (its ``model_name``).

    Decided before anything is downloaded, so a mismatch is one line instead of a function that answers
    503 after a multi-GB seed. ``--name`` must be the served model unless ``not_served`` says a second
    model is seeded on purpose (e.g. before switching ``model_name`` to it). Without a served model to
    compare with (flags instead of stack outputs), ``--name`` or the source's own name (``source_name``:
    the hub id or the S3 URL's folder) is taken as given. ``command`` ``rollback`` words the refusal
    for a rollback, which is held to the same rule: switching a folder the function does not read is
    almost always a typo, and it would leave the served model where it was.
    """
    name = model_slug(explicit) if explicit else None
    served = model_slug(target.model_name) if target.model_name else None
    if served is None:
        if name or source_name:
            return name or model_slug(str(source_name))
        raise SeedError(f"no model name: {ask_for('--name', '<model>')} (the stack has no model_name output)")
    if name is None or name == served:
        return served
    if not_served:
        return name
    flag, not_served_flag = option("--name"), option("--not-served")
    mismatch = f"{flag.rstrip('=')} {name} is not the model the function serves ({served})"
    if command == "rollback":
        raise SeedError(
            f"{mismatch}: drop {flag} to roll back {served}, or pass {not_served_flag} "
            f"to roll back {name} anyway"
        )
    raise SeedError(
        f"{mismatch}: drop {flag} to seed {served}, or set model_name = "
        f'"{name}" in terraform.tfvars and make apply, or pass {not_served_flag} to seed it for later'
    )
