"""The program the seeder runs: ``efs_sync`` and ``layout`` verbatim, packed as a zip application.

The bytes are deterministic (fixed timestamps and order), so the same package version always ships the
same program, and tests run exactly these bytes with the seeder's Python. The driver puts it in the
weights bucket under the weights prefix (which the seeder's role may read), named by its sha256:
``<prefix>.sd-lambda/efs-sync-<sha256[:16]>.pyz``; the SSM command fetches it and checks the full sha256.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import sd_lambda
from sd_lambda.seeding.upload import put_if_changed

PACKAGE_DIR = Path(sd_lambda.__file__).parent
# (path inside the zip, source file or None for an empty package marker)
MEMBERS: tuple[tuple[str, Path | None], ...] = (
    ("sd_lambda/__init__.py", None),
    ("sd_lambda/layout.py", PACKAGE_DIR / "layout.py"),
    ("sd_lambda/seeding/__init__.py", None),
    ("sd_lambda/seeding/efs_sync.py", PACKAGE_DIR / "seeding" / "efs_sync.py"),
)
MAIN = "import sys\n\nfrom sd_lambda.seeding.efs_sync import main\n\nsys.exit(main())\n"
# Next to the model folders; a model's name starts with a letter or digit, so never this.
PROGRAM_FOLDER = ".sd-lambda"


@cache
def program_bytes() -> bytes:
    """The zip application (``python3 program.pyz sync ...``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, source in (("__main__.py", None), *MEMBERS):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            text = MAIN if name == "__main__.py" else (source.read_bytes() if source else b"")
            archive.writestr(info, text, compresslevel=9)
    return buffer.getvalue()


def program_sha256() -> str:
    return hashlib.sha256(program_bytes()).hexdigest()


def write_program(path: Path) -> Path:
    path.write_bytes(program_bytes())
    return path


def program_key(key_prefix: str) -> str:
    """The program's key under the weights prefix (``models/``, or empty for the bucket's root)."""
    return f"{key_prefix}{PROGRAM_FOLDER}/efs-sync-{program_sha256()[:16]}.pyz"


@dataclass(frozen=True)
class ShippedProgram:
    """The program in S3, where the seeder fetches it from."""

    bucket: str
    key: str
    sha256: str
    uploaded: bool  # False: it was already there, byte for byte

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def ship_program(s3: Any, bucket: str, key_prefix: str) -> ShippedProgram:
    """Put the program in the bucket, unless an earlier run already did."""
    key = program_key(key_prefix)
    uploaded = put_if_changed(s3, bucket, key, program_bytes(), "application/zip")
    return ShippedProgram(bucket, key, program_sha256(), uploaded)
