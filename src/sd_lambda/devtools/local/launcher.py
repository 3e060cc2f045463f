"""One local Lambda execution environment: the Runtime API plus the image's real entrypoint.

``LocalLambda`` starts ``<python> -m awslambdaric sd_lambda.serving.handler.handler`` as a subprocess with
``AWS_LAMBDA_RUNTIME_API`` pointing at a ``RuntimeAPI`` on 127.0.0.1 and the ``AWS_LAMBDA_*`` variables
Lambda sets, exactly the command the container image runs. ``python`` is a parameter so the same
environment can run from another virtualenv (the image's). When the process exits (a crash, an init
error, or a timeout, after which Lambda discards an environment) the next ``invoke`` starts a fresh one:
a new cold start, as on AWS. The process inherits only ``INHERITED`` and the function's settings
from the caller's environment: never the operator's AWS credentials.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from sd_lambda.devtools.local.runtime import InvocationResult, RuntimeAPI
from sd_lambda.settings import documented_variables

ENTRYPOINT = "sd_lambda.serving.handler.handler"
# What the function's process inherits from the operator's environment: what the interpreter,
# awslambdaric and the libraries need to run, plus the function's own settings. Everything else (AWS
# credentials and profiles, container credential URIs, tokens of any other tool) stays behind, as
# on AWS, where the function runs with only its execution role.
INHERITED = frozenset(
    {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "AWS_REGION",
    }
)


class LocalLambda:
    """``invoke(event)`` -> ``InvocationResult``, one at a time, through the real entrypoint."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        python: str = sys.executable,
        handler: str = ENTRYPOINT,
        function_name: str = "sd-lambda",
        memory_mb: int = 10240,
        timeout_s: float = 300.0,
        log_path: Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.runtime = RuntimeAPI(function_name=function_name, timeout_s=timeout_s)
        self.command = list(command) if command else [python, "-m", "awslambdaric", handler]
        self.handler = handler
        self.memory_mb = memory_mb
        self.extra_env = dict(env or {})
        self.log_path = log_path
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._lock = threading.Lock()

    def environment(self) -> dict[str, str]:
        settings = {name for name, _, _ in documented_variables()}
        env = {k: v for k, v in os.environ.items() if k in INHERITED or k in settings}
        env.update(
            {
                "AWS_LAMBDA_RUNTIME_API": self.runtime.address,
                "AWS_LAMBDA_FUNCTION_NAME": self.runtime.function_name,
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{self.runtime.function_name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": "local",
                "AWS_REGION": env.get("AWS_REGION", "us-east-1"),
                "AWS_DEFAULT_REGION": env.get("AWS_REGION", "us-east-1"),
                "_HANDLER": self.handler,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> LocalLambda:
        self.runtime.start()
        if self.log_path is not None:
            self._log_file = self.log_path.open("ab")
        self._spawn()
        return self

    def _spawn(self) -> None:
        self.runtime.new_environment()
        process = subprocess.Popen(
            self.command,
            env=self.environment(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT if self._log_file else None,
        )
        self._process = process
        self.starts += 1
        threading.Thread(target=self._watch, args=(process,), name="local-lambda-watch", daemon=True).start()

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        returncode = process.wait()
        if process is self._process:
            self.runtime.environment_exited(returncode)

    def invoke(self, event: Any, timeout_s: float | None = None) -> InvocationResult:
        """Invoke with ``event`` (bytes are sent as they are, anything else as JSON)."""
        payload = event if isinstance(event, bytes) else json.dumps(event).encode()
        with self._lock:
            if self.runtime.init_error is not None:
                self._stop_process()  # an environment whose init failed is discarded; the next one retries
            if self._process is None or self._process.poll() is not None:
                self._spawn()
            result = self.runtime.invoke(payload, timeout_s)
            if result.error_type == "Sandbox.Timedout":
                self._stop_process()  # Lambda discards a timed-out environment
            return result

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        self._stop_process()
        self.runtime.close()
        if self._log_file is not None:
            self._log_file.close()

    def __enter__(self) -> LocalLambda:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
