"""``sd-lambda serve`` and ``sd-lambda demo``: the real Lambda entrypoint behind a local function URL."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sd_lambda.devtools.local.frontdoor import FrontDoor
from sd_lambda.devtools.local.httpio import fetch
from sd_lambda.devtools.local.launcher import LocalLambda
from sd_lambda.devtools.local.models import ModelDirError, as_efs_layout, ensure_demo_model
from sd_lambda.devtools.local.runtime import InvocationResult
from sd_lambda.layout import ModelPaths

DEMO_PROMPT = "a red fox in fresh snow, golden hour"
REAL_MODEL_DIR = "models/tiny-sd"


def random_weights_note() -> list[str]:
    """Without --model-dir the demo serves the test model, whose weights are random: say so, and how to
    demo a real model (as a make command when run from make)."""
    from sd_lambda.cli import from_make, option

    demo = f"make demo {option('--model-dir')}" if from_make() else "sd-lambda demo --model-dir "
    return [
        "note      the test model has RANDOM weights: its picture is noise, by design (it proves the path,",
        "          not the art). To demo a real model, download one and point the demo at it:",
        "            .venv/bin/hf download segmind/tiny-sd --include '*.json' '*.txt' '*.safetensors' "
        f"--local-dir {REAL_MODEL_DIR}",
        f"            {demo}{REAL_MODEL_DIR}",
    ]


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the real Lambda entrypoint on 127.0.0.1 like a function URL",
        description="Run `python -m awslambdaric sd_lambda.serving.handler.handler` against a local "
        "Lambda Runtime API, behind an HTTP front door that speaks function URL payload 2.0. "
        "POST / generates, GET /health reports, GET / in a browser is a local playground page. "
        "Stop with Ctrl-C.",
    )
    _common(serve)
    serve.add_argument("--port", type=int, default=8080, help="front door port on 127.0.0.1")
    serve.add_argument("--queue-size", type=int, default=4, help="requests that may wait; more get 429")
    serve.set_defaults(func=run_serve)

    demo = subparsers.add_parser(
        "demo",
        help="one request through the real Lambda entrypoint -> demo.png, with timings",
        description="Builds the tiny test model in the EFS layout under the cache (unless --model-dir), "
        "starts the local runtime, sends a cold and a warm request, writes the image, prints timings.",
    )
    _common(demo)
    demo.add_argument("-o", "--output", type=Path, default=Path("demo.png"), help="where to write the image")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="what to draw")
    demo.add_argument("--seed", type=int, default=42, help="random seed")
    demo.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    demo.set_defaults(func=run_demo)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="a diffusers folder or an EFS-layout model folder (default: the tiny test model, built once)",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="where local models live")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs awslambdaric")
    parser.add_argument("--timeout", type=float, default=300.0, help="function timeout in seconds")


def _model(args: argparse.Namespace) -> ModelPaths:
    from sd_lambda.cli import CommandError

    if args.model_dir is None:
        return ensure_demo_model(args.cache_dir)
    try:
        return as_efs_layout(args.model_dir, args.cache_dir)
    except ModelDirError as exc:
        raise CommandError(str(exc)) from None


def _environment(args: argparse.Namespace, paths: ModelPaths, log_path: Path | None = None) -> LocalLambda:
    env = {"MODEL_ROOT": str(paths.model_dir.parent), "MODEL_NAME": paths.model_dir.name}
    return LocalLambda(env, python=args.python, timeout_s=args.timeout, log_path=log_path)


def _front_door(environment: LocalLambda, port: int, queue_size: int) -> FrontDoor:
    from sd_lambda.cli import CommandError

    try:
        return FrontDoor(environment.invoke, port=port, queue_size=queue_size)
    except OSError as exc:
        raise CommandError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def load_seconds(result: InvocationResult) -> float | None:
    """The model load a response reports in its ``server-timing`` (``load;dur=<ms>``), when it loaded."""
    from sd_lambda.ops.client import parse_server_timing

    try:
        headers = json.loads(result.payload or b"").get("headers") or {}
    except (ValueError, AttributeError):
        return None
    load_ms = parse_server_timing(str(headers.get("server-timing", ""))).get("load", 0.0)
    return load_ms / 1000 if load_ms > 0 else None


def _reporting_loads(environment: LocalLambda) -> Any:
    """``environment.invoke``, saying on stdout when a request loaded the model and how long it took."""

    def invoke(payload: bytes) -> InvocationResult:
        result = environment.invoke(payload)
        seconds = load_seconds(result)
        if seconds is not None:
            print(f"loaded    the model in {seconds:.1f} s (request {result.request_id})", flush=True)
        return result

    return invoke


def run_serve(args: argparse.Namespace) -> int:
    from sd_lambda.cli import CommandError

    paths = _model(args)
    environment = _environment(args, paths)
    try:
        door = FrontDoor(_reporting_loads(environment), port=args.port, queue_size=args.queue_size)
    except OSError as exc:
        raise CommandError(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}") from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    with environment, door:
        print(f"model     {paths.model_dir} (current -> {paths.current_revision()})")
        print("loading   on the first request (seconds for the test model, a minute or more for a real one)")
        print(f"listening {door.url}  (POST / generates, GET /health reports; Ctrl-C stops)")
        print(f"page      {door.url}/ in a browser: a playground to try requests (local only)")
        print(f'try       curl -X POST {door.url}/ -d \'{{"prompt":"a red fox"}}\' -o fox.png', flush=True)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Explicit handlers: a shell may start background jobs with SIGINT ignored.
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
        print("stopping", flush=True)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from sd_lambda.cli import CommandError
    from sd_lambda.ops.client import parse_server_timing

    paths = _model(args)
    body: dict[str, Any] = {"prompt": args.prompt, "seed": args.seed}
    if args.steps is not None:
        body["num_inference_steps"] = args.steps
    print(f"model     {paths.model_dir} (current -> {paths.current_revision()})")
    print(f"request   POST / {json.dumps(body)}")
    log_path = args.cache_dir / "demo-lambda.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"logs      {log_path} (the function's JSON log lines)")
    environment = _environment(args, paths, log_path)
    with environment, _front_door(environment, 0, 1) as door:
        print("loading   the model with the first request ...", flush=True)
        for label in ("cold", "warm"):
            started = time.perf_counter()
            status, headers, data = fetch(
                "POST", f"{door.url}/", json.dumps(body).encode(), {"content-type": "application/json"}, 3600
            )
            seconds = time.perf_counter() - started
            if status != 200:
                raise CommandError(
                    f"{label} request failed with HTTP {status}: {data.decode(errors='replace')}"
                )
            timings = headers.get("server-timing", "")
            if label == "cold":
                load_ms = parse_server_timing(timings).get("load", 0.0)
                print(f"loaded    the model in {load_ms / 1000:.1f} s", flush=True)
            print(
                f"{label:<9} HTTP {status} {headers['content-type']} {len(data)} bytes "
                f"in {seconds:.2f} s: {timings}",
                flush=True,
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    print(f"wrote     {args.output} (seed {headers['x-seed']}, revision {headers['x-model-revision']})")
    if args.model_dir is None:
        print("\n".join(random_weights_note()))
    return 0
