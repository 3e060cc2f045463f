"""The bench's OpenVINO side: its models (exports of the bench's model, made once) and which kernels ran.

Exports: the ``openvino`` and ``openvino_fast`` variants run ``<cache>/<model>-openvino``, the
``openvino_int8`` one ``<cache>/<model>-openvino-int8``, both written by the export module in the export
venv (``make install-export``: optimum-intel, NNCF and their torch live only there). Each export holds a
marker with the source's content hash and the export options; an export whose marker no longer matches
is made again, and a folder without the marker is never touched.

Kernels: ``python -m sd_lambda.devtools.bench_openvino kernels UNET_XML WIDTH HEIGHT BATCH`` compiles
the UNet IR for one static shape with ``PERF_COUNT`` on, runs one inference on zeros, and prints which
implementation (``exec_type``, e.g. ``brgconv_avx2_f32``, ``gemm_mlas_f32``) ran each layer type. The
bench runs it in a process of its own under the variant's ISA environment, so it sees what the worker's
OpenVINO chose, without adding a second compiled UNet to the worker's peak RSS.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sd_lambda.engine.model_defaults import vae_scale_factor
from sd_lambda.layout import BF16_VARIANT, OPENVINO_UNET, parse_weights_name
from sd_lambda.seeding.openvino_export import DEFAULT_WEIGHT_FORMAT

EXPORT_PYTHON = Path(".venv-export/bin/python")
EXPORT_MODULE = "sd_lambda.seeding.openvino_export"
EXPORT_MARKER = ".sd-lambda-bench-export.json"
EXPORT_TIMEOUT_SECONDS = 4 * 3600
KERNELS_TIMEOUT_SECONDS = 1800
KERNELS_PREFIX = "BENCH-KERNELS "
# The int8 export's calibration runs the real pipeline once per sample: a few are enough to time it
# (random weights have no image quality to keep).
DEFAULT_CALIBRATION_SAMPLES = 4
# Exec types that name an ISA above AVX2 (what an --isa avx2 run must not contain). MLAS's names
# (gemm_mlas_f32) name no ISA: MLAS picks its kernels from cpuid itself.
ABOVE_AVX2 = ("avx512", "amx", "avx10")


class ExportError(RuntimeError):
    pass


def export_folder(cache: Path, model_dir: Path, quantize: str | None) -> Path:
    """Where the bench keeps ``model_dir``'s export: ``<cache>/<name>-openvino[-<quantize>]``."""
    suffix = "-openvino" + (f"-{quantize}" if quantize else "")
    return cache / (model_dir.resolve().name + suffix)


def exported_files(model_dir: Path) -> list[Path]:
    """The source files an export reads: everything but the bf16 copies (the exporter loads the stored
    weights) and the bench's own markers."""
    files = []
    for path in sorted(model_dir.resolve().rglob("*")):
        if not path.is_file() or path.name.startswith(".sd-lambda-bench"):
            continue
        parsed = parse_weights_name(path.name)
        if parsed is not None and parsed.variant == BF16_VARIANT:
            continue
        files.append(path)
    return files


def source_hash(model_dir: Path) -> str:
    """The content hash of what an export of ``model_dir`` reads: each file's relative path and bytes."""
    root = model_dir.resolve()
    digest = hashlib.sha256()
    for path in exported_files(model_dir):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def export_marker(
    source_sha256: str, quantize: str | None, calibration_samples: int | None
) -> dict[str, Any]:
    """What an export was made from and how. A float export's weights are stored as the exporter's default
    format (the bench asks for it by name, and an export made under another default is made again); a
    quantised export's recipe has no format to record."""
    marker: dict[str, Any] = {
        "source_sha256": source_sha256,
        "quantize": quantize,
        "calibration_samples": calibration_samples,
    }
    if not quantize:
        marker["weight_format"] = DEFAULT_WEIGHT_FORMAT
    return marker


def export_command(
    source: Path, output: Path, quantize: str | None, calibration_samples: int | None, python: Path
) -> list[str]:
    command = [str(python), "-m", EXPORT_MODULE, str(source), str(output)]
    if not quantize:
        command += ["--weight-format", DEFAULT_WEIGHT_FORMAT]
    if quantize:
        command += ["--quantize", quantize]
        if calibration_samples is not None:
            command += ["--calibration-samples", str(calibration_samples)]
    return command


def ensure_export(
    model_dir: Path,
    folder: Path,
    quantize: str | None = None,
    calibration_samples: int | None = None,
    source_sha256: str | None = None,
    python: Path = EXPORT_PYTHON,
    progress: Callable[[str], None] = lambda line: None,
) -> Path:
    """``folder`` as an export of ``model_dir`` with these options: kept when its marker matches,
    otherwise exported again (into ``<folder>.partial``, renamed when complete). ExportError when
    ``folder`` exists without the bench's marker, or the export fails."""
    if not quantize:
        calibration_samples = None
    want = export_marker(source_sha256 or source_hash(model_dir), quantize, calibration_samples)
    marker = folder / EXPORT_MARKER
    if folder.exists():
        if not marker.is_file():
            raise ExportError(f"{folder} exists and is not a bench export; move it or pass another --cache")
        if json.loads(marker.read_text()) == want:
            return folder
        progress(f"{folder} was exported from another source or with other options: exporting again")
        shutil.rmtree(folder)
    if not python.is_file():
        raise ExportError(f"the OpenVINO variants export the model with {python}: run make install-export")
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    progress(f"exporting {model_dir} to OpenVINO IR in {folder}{f' ({quantize})' if quantize else ''} (once)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        export_command(model_dir.resolve(), staging, quantize, calibration_samples, python),
        capture_output=True,
        text=True,
        timeout=EXPORT_TIMEOUT_SECONDS,
        check=False,
    )
    if completed.returncode != 0 or not (staging / OPENVINO_UNET).is_file():
        tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
        raise ExportError(f"exporting {model_dir} to OpenVINO IR exited {completed.returncode}: {tail}")
    (staging / EXPORT_MARKER).write_text(json.dumps(want, indent=2) + "\n")
    staging.rename(folder)
    return folder


# IR element types of weights, as the bench names them.
_WEIGHT_TYPES = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "u8": "int8", "i8": "int8"}


def constant_bytes(graph: Path) -> dict[str, int]:
    """Bytes of an IR's constants (``Const`` layers) by element type (``f16``, ``f32``, ``u8``, ...)."""
    import xml.etree.ElementTree as ElementTree

    sizes: dict[str, int] = {}
    for layer in ElementTree.parse(graph).getroot().iterfind("./layers/layer[@type='Const']"):
        data = layer.find("data")
        if data is not None and data.get("element_type"):
            kind = data.get("element_type", "")
            sizes[kind] = sizes.get(kind, 0) + int(data.get("size", 0))
    return sizes


def stored_weights(graph: Path) -> str:
    """How an IR stores its weights: the weight type holding most of its constants' bytes (``fp16`` for
    the default export, ``fp32``, ``int8`` for a quantised one)."""
    sizes: dict[str, int] = {}
    for kind, size in constant_bytes(graph).items():
        if kind in _WEIGHT_TYPES:
            sizes[_WEIGHT_TYPES[kind]] = sizes.get(_WEIGHT_TYPES[kind], 0) + size
    return max(sizes, key=sizes.__getitem__) if sizes else "none"


def static_shapes(
    inputs: Iterable[tuple[str, list[int | None]]], batch: int, latent: tuple[int, int]
) -> dict:
    """Each UNet input's shape at one request shape: dynamic dimensions filled in as the pipeline
    calls it (the batch first; a 4-d input is the latents, whose last two are the latent size)."""
    shapes = {}
    for name, dims in inputs:
        filled = list(dims)
        if filled and filled[0] is None:
            filled[0] = batch
        if len(filled) == 4:
            filled[2], filled[3] = latent
        if None in filled:
            raise ValueError(f"UNet input {name} has a dimension the bench cannot infer: {dims}")
        shapes[name] = filled
    return shapes


def summarize_kernels(profile: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per layer type (``node_type``), per implementation (``exec_type``): how many executed nodes
    ran it and their milliseconds. Nodes that did not run (fused into another, optimised out) are left
    out."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for node in profile:
        if node["status"] != "EXECUTED":
            continue
        entry = summary.setdefault(node["node_type"], {}).setdefault(
            node["exec_type"], {"count": 0, "ms": 0.0}
        )
        entry["count"] += 1
        entry["ms"] = round(entry["ms"] + node["real_ms"], 3)
    return {
        node_type: dict(sorted(kernels.items(), key=lambda item: -item[1]["ms"]))
        for node_type, kernels in sorted(
            summary.items(), key=lambda item: -sum(k["ms"] for k in item[1].values())
        )
    }


def above_avx2(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The exec types in a kernel summary that name an ISA above AVX2."""
    return sorted(
        {
            exec_type
            for kernels in summary.values()
            for exec_type in kernels
            if any(isa in exec_type for isa in ABOVE_AVX2)
        }
    )


def profile_unet(unet_xml: Path, width: int, height: int, batch: int) -> list[dict[str, Any]]:
    """One inference of the UNet IR compiled for this shape with PERF_COUNT: each node's profile."""
    import numpy
    import openvino

    core = openvino.Core()
    model = core.read_model(unet_xml)
    scale = vae_scale_factor(unet_xml.parent.parent)
    inputs = [
        (
            port.get_any_name(),
            [None if dim.is_dynamic else dim.get_length() for dim in port.get_partial_shape()],
        )
        for port in model.inputs
    ]
    shapes = static_shapes(inputs, batch, (height // scale, width // scale))
    model.reshape(shapes)
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    # By position: the compiled model's ports may carry other tensor names than the IR's first one.
    feed = [
        numpy.zeros(shapes[name], dtype=port.get_element_type().to_dtype())
        for (name, _), port in zip(inputs, compiled.inputs, strict=True)
    ]
    request.infer(feed)
    return [
        {
            "node_name": info.node_name,
            "node_type": info.node_type,
            "exec_type": info.exec_type,
            "status": info.status.name,
            "real_ms": info.real_time.total_seconds() * 1000,
        }
        for info in request.get_profiling_info()
    ]


def record_kernels(
    unet_xml: Path, width: int, height: int, batch: int, env: Mapping[str, str]
) -> dict[str, Any]:
    """Which kernels ran the UNet at this shape, in a process with ``env`` (the variant's ISA caps)."""
    command = [sys.executable, "-m", __name__, "kernels", str(unet_xml), str(width), str(height), str(batch)]
    completed = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=KERNELS_TIMEOUT_SECONDS
    )
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(KERNELS_PREFIX):
            summary = json.loads(line.removeprefix(KERNELS_PREFIX))
            return {"unet_batch": batch, "by_layer_type": summary, "above_avx2": above_avx2(summary)}
    tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
    raise ExportError(f"profiling {unet_xml} exited {completed.returncode} without a result: {tail}")


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] != "kernels":
        print(
            "usage: python -m sd_lambda.devtools.bench_openvino kernels UNET_XML WIDTH HEIGHT BATCH",
            file=sys.stderr,
        )
        return 2
    unet_xml, width, height, batch = Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    print(
        KERNELS_PREFIX + json.dumps(summarize_kernels(profile_unet(unet_xml, width, height, batch))),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
