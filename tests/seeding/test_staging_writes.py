"""How the program writes into staging, watched at the os layer (in this process, with a stand-in
``aws`` that copies from a local folder): every file, the manifest included, takes its name by a rename."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from sd_lambda.layout import MANIFEST, Manifest, ModelPaths
from sd_lambda.seeding import efs_sync

from .conftest import make_model

NAME = "acme--tiny-sd"


@pytest.fixture
def local_aws(tmp_path: Path) -> tuple[Path, Path]:
    """``aws s3 cp s3://bucket/KEY DEST`` served from ``<tmp>/s3/KEY``."""
    store = tmp_path / "s3"
    store.mkdir()
    cli = tmp_path / "aws"
    cli.write_text(
        "#!/bin/sh\n"
        f'key="${{3#s3://bucket/}}"\n'
        f'if [ "$4" = - ]; then exec cat {shlex.quote(str(store))}/"$key"; fi\n'
        f'exec cp {shlex.quote(str(store))}/"$key" "$4"\n'
    )
    cli.chmod(0o755)
    return cli, store


def test_every_staged_file_takes_its_name_by_rename(
    tmp_path: Path, local_aws: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli, store = local_aws
    folder = make_model(tmp_path / "v1", "v1")
    manifest = Manifest.build(folder, source="test")
    prefix = store / "models" / NAME / "r1"
    for entry in manifest.files:
        (prefix / entry.path).parent.mkdir(parents=True, exist_ok=True)
        (prefix / entry.path).write_bytes((folder / entry.path).read_bytes())
    (prefix / MANIFEST).write_text(manifest.to_json())
    mount = tmp_path / "efs"
    mount.mkdir()
    staging = ModelPaths(mount / NAME).staging("r1")
    renamed_into_staging: list[str] = []
    real_replace = os.replace

    def replace(source: str | Path, destination: str | Path) -> None:
        if Path(destination).is_relative_to(staging):
            renamed_into_staging.append(Path(destination).relative_to(staging).as_posix())
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)

    code = efs_sync.main(
        ["sync", "--mount", str(mount), "--name", NAME, "--revision", "r1", "--bucket", "bucket",
         "--s3-prefix", f"models/{NAME}/r1/", "--aws-cli", str(cli), "--owner", "none"]
    )  # fmt: skip

    assert code == 0
    assert sorted(renamed_into_staging) == sorted([MANIFEST, *(entry.path for entry in manifest.files)])
