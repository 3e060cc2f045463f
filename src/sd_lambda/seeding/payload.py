"""The program the seeder runs: ``efs_sync`` and ``layout`` verbatim, packed as a zip application.

The bytes are deterministic (fixed timestamps and order), so the same package version always sends the
same program, and tests run exactly these bytes with the seeder's Python.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from functools import cache
from pathlib import Path

import sd_lambda

PACKAGE_DIR = Path(sd_lambda.__file__).parent
# (path inside the zip, source file or None for an empty package marker)
MEMBERS: tuple[tuple[str, Path | None], ...] = (
    ("sd_lambda/__init__.py", None),
    ("sd_lambda/layout.py", PACKAGE_DIR / "layout.py"),
    ("sd_lambda/seeding/__init__.py", None),
    ("sd_lambda/seeding/efs_sync.py", PACKAGE_DIR / "seeding" / "efs_sync.py"),
)
MAIN = "import sys\n\nfrom sd_lambda.seeding.efs_sync import main\n\nsys.exit(main())\n"


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
