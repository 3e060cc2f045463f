"""Which OpenVINO runtime should serve: OpenVINO GenAI's torch-free pipeline or optimum-intel's.

    python -m sd_lambda.devtools.openvino_runtimes OPENVINO_RELEASE [--side 512] [--steps 2]

Runs each in a fresh process (GenAI in this venv, optimum-intel in the export venv, the only one
that has it) on the same release and shape, and prints one JSON line each: seconds to import, to load
and compile for the shape, to make the first image, and the peak RSS. docs/performance.md reports the
result; the engine uses the runtime this comparison chose.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from sd_lambda.devtools.bench_openvino import EXPORT_PYTHON


def run_genai(release: Path, side: int, steps: int) -> dict[str, float]:
    started = time.perf_counter()
    import openvino_genai

    imported = time.perf_counter()
    pipeline = openvino_genai.Text2ImagePipeline(str(release))
    pipeline.reshape(1, side, side, 7.5)
    pipeline.compile("CPU", INFERENCE_PRECISION_HINT="f32")
    loaded = time.perf_counter()
    pipeline.generate(
        "a red fox",
        width=side,
        height=side,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=openvino_genai.CppStdGenerator(0),  # TorchGenerator would import torch
    )
    return times(started, imported, loaded, time.perf_counter())


def times(started: float, imported: float, loaded: float, generated: float) -> dict[str, float]:
    return {
        "import_s": round(imported - started, 2),
        "load_compile_s": round(loaded - imported, 2),
        "first_image_s": round(generated - loaded, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


# runtime -> (the python that has it, the module that measures it there)
RUNTIMES = {
    "genai": (Path(sys.executable), "sd_lambda.devtools.openvino_runtimes"),
    "optimum": (EXPORT_PYTHON, "sd_lambda.devtools.optimum_runtime"),  # relative: run from the checkout
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sd_lambda.devtools.openvino_runtimes", description=__doc__
    )
    parser.add_argument("release", type=Path, help="an OpenVINO release (optimum-intel's export layout)")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--here", action="store_true", help="measure GenAI in this process")
    args = parser.parse_args(argv)
    if args.here:
        print(json.dumps({"runtime": "genai", **run_genai(args.release, args.side, args.steps)}))
        return 0
    for name, (python, module) in RUNTIMES.items():
        command = [str(python), "-m", module, str(args.release), "--side", str(args.side)]
        completed = subprocess.run(
            [*command, "--steps", str(args.steps), "--here"], capture_output=True, text=True
        )
        lines = completed.stdout.strip().splitlines()
        print(
            lines[-1]
            if completed.returncode == 0 and lines
            else json.dumps({"runtime": name, "error": completed.stderr.strip().splitlines()[-1:]})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
