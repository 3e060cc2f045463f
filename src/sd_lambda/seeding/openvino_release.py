"""An OpenVINO release from a diffusers source (``seed --export openvino``, fp16 weights by default;
``--weight-format fp32`` or ``--quantize int8``).

The conversion needs optimum-intel, NNCF and torch, which live in the export venv only (``make
install-export``): the driver runs sd_lambda.seeding.openvino_export there as a child process, on one
folder holding the source release's files, into a folder under ``--work-dir``. What it writes is checked
like any local folder (``sources.check_dir``) and becomes the release: manifest, upload, sync, verification
and switch are the ones every release goes through.

The export Python is ``--export-python``; its default is ``.venv-export/bin/python`` under the current
directory, the checkout's export venv (``make seed-models`` passes its own ``EXPORT_VENV``'s).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sd_lambda.cli import option
from sd_lambda.layout import OPENVINO_UNET, release_engine, sha256_file
from sd_lambda.seeding import openvino_export
from sd_lambda.seeding.errors import SeedError

if TYPE_CHECKING:
    from sd_lambda.seeding.sources import LocalRelease

EXPORT_FORMATS = ("openvino",)
DEFAULT_EXPORT_PYTHON = Path(".venv-export") / "bin" / "python"
# What the export needs and the driver checks before AWS: the broken-torchvision case fails this import.
EXPORT_IMPORTS = "import optimum.intel, sd_lambda.seeding.openvino_export"
EXPORTS_FOLDER = "openvino-exports"
# Lines of the exporter's stderr an export failure quotes (its log keeps all of them).
ERROR_TAIL_LINES = 3


@dataclass(frozen=True)
class ExportOptions:
    """What ``--export openvino`` runs: the export venv's Python, how the float weights are stored and the
    quantisation asked for."""

    python: Path
    quantize: str | None = None
    calibration_prompts: Path | None = None
    calibration_samples: int | None = None  # None: openvino_export's default
    weight_format: str | None = None  # None: openvino_export's default (a float export only)

    @property
    def stored_as(self) -> str:
        """How the release stores its weights: the quantisation, else the float weight format."""
        return self.quantize or self.weight_format or openvino_export.DEFAULT_WEIGHT_FORMAT

    @property
    def suffix(self) -> str:
        """The default revision's suffix: ``openvino`` (the default fp16 weights), ``openvino-fp32`` or
        ``openvino-int8``."""
        stored = self.stored_as
        return "openvino" + ("" if stored == openvino_export.DEFAULT_WEIGHT_FORMAT else f"-{stored}")

    @property
    def samples(self) -> int | None:
        """The calibration's UNet calls, when it quantises."""
        if not self.quantize:
            return None
        return self.calibration_samples or openvino_export.DEFAULT_CALIBRATION_SAMPLES

    def arguments(self) -> list[str]:
        """The export's options after SOURCE OUTPUT (openvino_export's command line)."""
        argv = ["--quantize", self.quantize] if self.quantize else []
        if self.weight_format is not None:
            argv += ["--weight-format", self.weight_format]
        if self.calibration_prompts is not None:
            argv += ["--calibration-prompts", str(self.calibration_prompts.resolve())]
        if self.calibration_samples is not None:
            argv += ["--calibration-samples", str(self.calibration_samples)]
        return argv

    def describe(self) -> str:
        """How the manifest's source names the conversion."""
        if not self.quantize:
            return f"openvino {self.stored_as}"
        prompts = self.calibration_prompts.name if self.calibration_prompts else "built-in prompts"
        return f"openvino {self.quantize} (hybrid, {self.samples} calibration samples, {prompts})"


def check_options(options: ExportOptions) -> None:
    """Everything about an export that can fail before AWS and the hub: the calibration options and the
    export Python (there, and able to import optimum-intel)."""
    if options.quantize and options.weight_format is not None:
        raise SeedError(
            f"{option('--weight-format')} applies to a float export and {option('--quantize')} stores "
            "int8 weights: drop one"
        )
    if options.calibration_samples is not None and options.calibration_samples < 1:
        raise SeedError("--calibration-samples must be at least 1")
    if options.calibration_prompts is not None:
        try:
            openvino_export.read_prompts(options.calibration_prompts)
        except (OSError, ValueError) as exc:
            raise SeedError(f"--calibration-prompts: {exc}") from exc
    check_export_python(options.python)


def check_export_python(python: Path) -> None:
    install = "run make install-export (the OpenVINO export tools)"
    if not python.is_file():
        raise SeedError(f"no export Python at {python}: {install}")
    try:
        done = subprocess.run(
            [str(python), "-c", EXPORT_IMPORTS],
            capture_output=True,
            text=True,
            timeout=300,
            env=_child_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SeedError(f"{python} does not run ({exc}): {install}") from exc
    if done.returncode != 0:
        raise SeedError(f"{python} cannot import optimum.intel ({_tail(done.stderr, 1)}): {install}")


def export_openvino(release: LocalRelease, work_dir: Path, options: ExportOptions) -> LocalRelease:
    """``release`` converted to OpenVINO IR. A folder exported earlier from the same files with the same
    options is reused: an int8 export calibrates on random latents, so a second one would differ and
    could not be uploaded under the revision the first one took."""
    # The hub client and the AWS flow only when a release is made: `seed --help` reads this module too.
    from sd_lambda.seeding.flow import log
    from sd_lambda.seeding.sources import LocalRelease, check_dir, refuse_openvino_source

    refuse_openvino_source(release.files, release.manifest.source)
    exports = Path(work_dir) / EXPORTS_FOLDER
    output = exports / f"{release.revision}-{options.suffix}-{_export_key(release, options)[:12]}"
    if output.is_dir():
        log(f"reusing the OpenVINO export in {output}")
    else:
        _run_export(release, output, options)
    files = check_dir(output)
    if release_engine(files) != "openvino":
        raise SeedError(f"the OpenVINO export in {output} has no {OPENVINO_UNET}")
    return LocalRelease.from_files(
        files,
        source=f"{release.manifest.source} -> {options.describe()}",
        revision=f"{release.revision}-{options.suffix}",
    )


def _export_key(release: LocalRelease, options: ExportOptions) -> str:
    """The source's content and the export's options, the prompts' text included."""
    prompts = sha256_file(options.calibration_prompts) if options.calibration_prompts else None
    described = {
        "files": [[entry.path, entry.sha256] for entry in release.manifest.files],
        "quantize": options.quantize,
        "samples": options.samples,
        "prompts": prompts,
    }
    if not options.quantize:  # a quantised export's recipe (an fp32 base) is what it was before formats
        described["weights"] = options.stored_as
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _run_export(release: LocalRelease, output: Path, options: ExportOptions) -> None:
    """One folder of the source's files (symlinks), the export into a partial folder beside ``output``,
    renamed to ``output`` when it succeeded: an interrupted export is never reused."""
    from sd_lambda.seeding.flow import log

    partial = output.with_name(f".{output.name}.partial")
    source = output.with_name(f".{output.name}.source")
    for leftover in (partial, source):
        shutil.rmtree(leftover, ignore_errors=True)
    for path, local in release.files.items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).symlink_to(Path(local).resolve())
    log_path = output.with_name(f"{output.name}.log")
    argv = [str(options.python), "-m", "sd_lambda.seeding.openvino_export", str(source), str(partial)]
    argv += options.arguments()
    log(f"converting to OpenVINO IR ({options.describe()}) with {options.python}; its log: {log_path}")
    started = time.monotonic()
    try:
        with log_path.open("w") as handle:
            code = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=_child_env()).returncode
    except OSError as exc:
        raise SeedError(f"the OpenVINO export did not start ({exc}): run make install-export") from exc
    finally:
        shutil.rmtree(source, ignore_errors=True)
    if code != 0:
        shutil.rmtree(partial, ignore_errors=True)
        tail = _tail(log_path.read_text(errors="replace"), ERROR_TAIL_LINES)
        raise SeedError(f"the OpenVINO export failed (exit {code}): {tail} (log: {log_path})")
    os.rename(partial, output)
    log(f"converted in {time.monotonic() - started:.0f} s: {output}")


def _child_env() -> dict[str, str]:
    # The export reads the local folder only: the hub is never asked (an operator machine may be offline).
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _tail(text: str, lines: int) -> str:
    kept: Sequence[str] = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "no output"
