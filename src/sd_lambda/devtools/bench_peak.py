"""The CPU's measured f32 rate: the ceiling under every variant's FLOPs, and so under every speed target.

The nominal peak (threads x reported clock x FLOPs per cycle) misses boost clocks and says nothing of
what the libraries reach. This probe times the kernels a Stable Diffusion UNet spends its time in, each
at its best over a few runs, in a process of its own under the bench's ISA environment:

- ``conv3x3``: OpenVINO's f32 3x3 convolution at the UNet's first stage (batch 2, 320 channels, 64x64
  latents: 512x512) and ``conv3x3_deep`` at its deepest (1280 channels, 8x8);
- ``fully_connected``: OpenVINO's f32 MatMul with f32 constant weights (FullyConnected: MLAS where the
  CPU plugin picks it, as for an fp32 IR's linears);
- ``torch_mm``: torch's f32 matmul (what the torch engine's linears run).

``peak`` is the fastest of them. A variant whose image needs F FLOPs cannot take less than F / peak
seconds, so a ratio target its FLOPs cannot reach at that rate is out of reach for its arithmetic, not
its engine: the bench states that bound beside each target.

    python -m sd_lambda.devtools.bench_peak [THREADS]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

PEAK_PREFIX = "BENCH-PEAK "
PEAK_TIMEOUT_SECONDS = 600
RUNS = 5


class PeakError(RuntimeError):
    pass


def _best_seconds(run: Callable[[], object], runs: int = RUNS) -> float:
    run()  # the first run pays for the kernels' JIT and the caches
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def _openvino_rates(threads: int) -> dict[str, float]:
    import numpy as np
    import openvino
    from openvino import opset13 as ops

    core = openvino.Core()
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
    }
    rng = np.random.default_rng(0)

    def rate(output: Any, parameter: Any, flops: float) -> float:
        compiled = core.compile_model(openvino.Model([output], [parameter]), "CPU", config)
        request = compiled.create_infer_request()
        feed = rng.random(tuple(parameter.get_output_shape(0)), dtype=np.float32)
        return flops / _best_seconds(lambda: request.infer([feed])) / 1e9

    rates = {}
    for name, batch, channels, side in (("conv3x3", 2, 320, 64), ("conv3x3_deep", 2, 1280, 8)):
        sample = ops.parameter([batch, channels, side, side], np.float32)
        weights = ops.constant(rng.random((channels, channels, 3, 3), dtype=np.float32) - 0.5)
        conv = ops.convolution(sample, weights, [1, 1], [1, 1], [1, 1], [1, 1])
        rates[name] = rate(conv, sample, 2 * batch * channels * channels * 9 * side * side)
    rows, inner, outer = 4096, 1280, 5120  # 4096 tokens through a 1280 -> 5120 feed-forward
    tokens = ops.parameter([rows, inner], np.float32)
    weights = ops.constant(rng.random((outer, inner), dtype=np.float32) - 0.5)
    rates["fully_connected"] = rate(
        ops.matmul(tokens, weights, False, True), tokens, 2 * rows * inner * outer
    )
    return rates


def _torch_rate(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    left, right = torch.rand(4096, 1280), torch.rand(1280, 5120)
    return 2 * 4096 * 1280 * 5120 / _best_seconds(lambda: left @ right) / 1e9


def measure(threads: int) -> dict[str, Any]:
    """GFLOP/s of each probe kernel and ``peak``, the fastest."""
    rates = {**_openvino_rates(threads), "torch_mm": _torch_rate(threads)}
    return {
        "threads": threads,
        "gflops": {k: round(v, 1) for k, v in rates.items()},
        "peak": round(max(rates.values()), 1),
    }


def record_peak(threads: int, env: Mapping[str, str]) -> dict[str, Any]:
    """``measure`` in a process with ``env`` (the variant's ISA caps), as the workers run."""
    command = [sys.executable, "-m", __name__, str(threads)]
    try:
        completed = subprocess.run(
            command, env={**os.environ, **env}, capture_output=True, text=True, timeout=PEAK_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise PeakError(f"the peak probe took more than {PEAK_TIMEOUT_SECONDS} s") from None
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(PEAK_PREFIX):
            return json.loads(line.removeprefix(PEAK_PREFIX))
    tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
    raise PeakError(f"the peak probe exited {completed.returncode} without a result: {tail}")


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and not argv[0].isdigit()):
        print("usage: python -m sd_lambda.devtools.bench_peak [THREADS]", file=sys.stderr)
        return 2
    threads = int(argv[0]) if argv else os.cpu_count() or 1
    print(PEAK_PREFIX + json.dumps(measure(threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
