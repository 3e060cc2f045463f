"""optimum-intel's OpenVINO pipeline, measured in the export venv (the only one that has it) for
sd_lambda.devtools.openvino_runtimes, which runs this module there and compares it with GenAI's."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sd_lambda.devtools.openvino_runtimes import times


def run_optimum(release: Path, side: int, steps: int) -> dict[str, float]:
    started = time.perf_counter()
    from optimum.intel import OVStableDiffusionPipeline

    imported = time.perf_counter()
    pipeline = OVStableDiffusionPipeline.from_pretrained(
        release, compile=False, ov_config={"INFERENCE_PRECISION_HINT": "f32"}
    )
    pipeline.reshape(batch_size=1, height=side, width=side, num_images_per_prompt=1)
    pipeline.compile()
    loaded = time.perf_counter()
    pipeline("a red fox", width=side, height=side, num_inference_steps=steps, guidance_scale=7.5)
    return times(started, imported, loaded, time.perf_counter())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_lambda.devtools.optimum_runtime", description=__doc__)
    parser.add_argument("release", type=Path)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--here", action="store_true", help="(always: this module runs in this process)")
    args = parser.parse_args(argv)
    print(json.dumps({"runtime": "optimum", **run_optimum(args.release, args.side, args.steps)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
