"""Call the function URL: ``generate(url, prompt, ...)`` and ``sd-lambda generate``.

The URL's auth type is ``AWS_IAM``, so every request carries a SigV4 signature (botocore's
``SigV4Auth``, service ``lambda``) computed over exactly the bytes sent. Credentials come from
botocore's default chain (environment, profile, SSO, instance role), never from this code. Each
attempt is signed afresh, because the signature covers the request time. Throttling (429), Lambda's
own outages (502/503/504) and connection failures are retried with full-jitter exponential backoff;
any other error is final and reported with the function's own message.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import ipaddress
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sd_lambda.cli import add_json_flag
from sd_lambda.serving.request import GenerationRequest, choices, type_name

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 900.0  # Lambda's maximum run time: a response cannot take longer
SERVICE = "lambda"
FUNCTION_URL_HOST = re.compile(r"^[a-z0-9]+\.lambda-url\.([a-z]{2}(?:-[a-z]+)+-\d+)\.on\.aws\Z")
FORBIDDEN_HINT = (
    "the caller needs both lambda:InvokeFunctionUrl and lambda:InvokeFunction on the function "
    "(and the function's resource policy must allow them); also check --region and the clock"
)
# The request fields the function accepts: read from the function's own request model.
REQUEST_FIELDS = tuple(GenerationRequest.model_fields)
# The CLI's shorter spelling of some fields; every other field is --<name-with-dashes>.
FLAGS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "output_format": "--format",
    "loras": "--lora",
}


class InvokeError(Exception):
    """The function could not be called, or answered with an error. The message says which and why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry; ``sleep`` and ``random`` are injectable for tests."""

    attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 20.0
    sleep: Callable[[float], None] = time.sleep
    random: Callable[[], float] = random.random

    def delay(self, failed_attempts: int, retry_after: float | None = None) -> float:
        """Full jitter (AWS Architecture Blog): uniform in [0, min(cap, base * 2**(n-1))]."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (failed_attempts - 1))
        delay = self.random() * ceiling
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay_s))
        return delay


@dataclass(frozen=True)
class GenerationResponse:
    """The function's answer: ``images[i]`` was generated with ``seeds[i]`` (the first seed + i)."""

    images: tuple[bytes, ...]
    content_type: str
    seeds: tuple[int | None, ...]
    timings_ms: dict[str, float]
    request_id: str | None
    model: str | None
    revision: str | None
    fallback: str | None
    attempts: int

    @property
    def image(self) -> bytes:
        return self.images[0]

    @property
    def seed(self) -> int | None:
        return self.seeds[0]

    @classmethod
    def from_http(cls, body: bytes, headers: Mapping[str, str], attempts: int) -> GenerationResponse:
        """A binary response (one image, metadata in headers) or the JSON one (a list of images)."""
        if headers.get("content-type", "").startswith("application/json"):
            return cls.from_json(body, attempts)
        seed = headers.get("x-seed")
        return cls(
            images=(body,),
            content_type=headers.get("content-type", "application/octet-stream"),
            seeds=(int(seed) if seed and seed.isdigit() else None,),
            timings_ms=parse_server_timing(headers.get("server-timing", "")),
            request_id=headers.get("x-request-id"),
            model=headers.get("x-model"),
            revision=headers.get("x-model-revision"),
            fallback=headers.get("x-image-fallback"),
            attempts=attempts,
        )

    @classmethod
    def from_json(cls, body: bytes, attempts: int) -> GenerationResponse:
        """The JSON response: ``{"images": [{"image": <base64>, "seed"}, ...], "content_type", ...}``."""
        try:
            data = json.loads(body)
            entries = data["images"]
            images = tuple(base64.b64decode(entry["image"], validate=True) for entry in entries)
            seeds = tuple(entry.get("seed") for entry in entries)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise InvokeError(f"the function's JSON response is not the documented shape ({exc})") from None
        fallback = data.get("fallback_from")
        model = data.get("model") or {}
        return cls(
            images=images,
            content_type=data.get("content_type", "application/octet-stream"),
            seeds=seeds,
            timings_ms=data.get("timings") or {},
            request_id=data.get("request_id"),
            model=model.get("name"),
            revision=model.get("revision"),
            fallback=f"{fallback}->{data.get('format')}" if fallback else None,
            attempts=attempts,
        )

    def summary(self) -> str:
        timings = "  ".join(f"{name} {ms:g} ms" for name, ms in self.timings_ms.items())
        model = f"{self.model}@{self.revision}" if self.model else "unknown model"
        seeds = f"seed {self.seed}" if len(self.seeds) == 1 else f"seeds {', '.join(map(str, self.seeds))}"
        parts = [seeds, timings, f"{model}", f"request {self.request_id}"]
        parts.append(f"{self.attempts} attempt{'s' if self.attempts > 1 else ''}")
        return "  |  ".join(part for part in parts if part)


def parse_server_timing(value: str) -> dict[str, float]:
    """``load;dur=0.0, inference;dur=812.3`` -> ``{"load": 0.0, "inference": 812.3}``."""
    timings: dict[str, float] = {}
    for metric in filter(None, (part.strip() for part in value.split(","))):
        name, *params = (piece.strip() for piece in metric.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if key == "dur":
                with contextlib.suppress(ValueError):
                    timings[name] = float(number)
    return timings


def region_from_url(url: str) -> str | None:
    """The region of a function URL (``https://<id>.lambda-url.<region>.on.aws/``), else None."""
    match = FUNCTION_URL_HOST.match(urlsplit(url).hostname or "")
    return match.group(1) if match else None


def default_credentials(profile: str | None = None) -> Any:
    """Frozen credentials from botocore's default chain (or ``profile``); InvokeError if there are none."""
    import botocore.exceptions
    import botocore.session

    try:
        credentials = botocore.session.Session(profile=profile).get_credentials()
    except botocore.exceptions.ProfileNotFound as exc:
        raise InvokeError(str(exc)) from None
    if credentials is None:
        raise InvokeError(
            "no AWS credentials found (environment, shared config/profile, SSO or instance role); "
            "run `aws configure` or `aws sso login`, or pass --profile"
        )
    return credentials


def sign(
    url: str, body: bytes, headers: Mapping[str, str], credentials: Any, region: str, method: str = "POST"
) -> dict[str, str]:
    """The headers to send: ``headers`` plus SigV4's date, token and Authorization over ``body``."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    frozen = (
        credentials.get_frozen_credentials()
        if hasattr(credentials, "get_frozen_credentials")
        else credentials
    )
    SigV4Auth(frozen, SERVICE, region).add_auth(request)
    return dict(request.headers.items())


@dataclass
class FunctionUrlClient:
    """One function URL; ``post`` signs, sends and retries. Reuses one HTTP connection pool."""

    url: str
    region: str | None = None
    credentials: Any = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    session: Any = None

    def __post_init__(self) -> None:
        import requests

        parts = urlsplit(self.url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise InvokeError(f"{self.url!r} is not an http(s) URL")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise InvokeError(
                f"refusing http:// to {parts.hostname}: the signed request and any session token would "
                "travel in clear text; use https (plain http is only for loopback test servers)"
            )
        self.region = self.region or region_from_url(self.url)
        if self.region is None:
            raise InvokeError(
                f"cannot tell the region from {parts.hostname} (not <id>.lambda-url.<region>.on.aws): "
                "pass --region"
            )
        if self.credentials is None:
            self.credentials = default_credentials()
        if self.session is None:
            self.session = requests.Session()

    def post(self, payload: Mapping[str, Any], accept: str = "image/*") -> tuple[bytes, dict[str, str], int]:
        """POST ``payload`` as JSON; (body, lower-cased headers, attempts) of the successful response."""
        import requests

        try:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except ValueError:
            raise InvokeError(
                "the request holds NaN or infinity; the function accepts finite numbers only"
            ) from None
        base_headers = {"Content-Type": "application/json", "Accept": accept}
        last_failure = ""
        for attempt in range(1, self.retry.attempts + 1):
            headers = sign(self.url, body, base_headers, self.credentials, str(self.region))
            retry_after = None
            try:
                response = self.session.post(
                    self.url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False
                )
            except requests.exceptions.ReadTimeout:
                # The function may still be running: sending it again would only double the work.
                raise InvokeError(f"no response within {self.timeout[1]:g} s (read timeout)") from None
            except requests.exceptions.ConnectionError as exc:
                last_failure = f"connection failed: {_first_line(exc)}"
            else:
                response_headers = {name.lower(): value for name, value in response.headers.items()}
                if response.status_code < 300:
                    return response.content, response_headers, attempt
                if response.status_code not in RETRYABLE_STATUS:
                    raise error_from_response(response.status_code, response.content, response_headers)
                last_failure = f"HTTP {response.status_code}: {_error_message(response.content)}"
                retry_after = _retry_after(response_headers.get("retry-after"))
            if attempt < self.retry.attempts:
                self.retry.sleep(self.retry.delay(attempt, retry_after))
        raise InvokeError(f"gave up after {self.retry.attempts} attempts; last: {last_failure}")


def is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> InvokeError:
    message = _error_message(body)
    request_id = headers.get("x-request-id") or headers.get("x-amzn-requestid")
    suffix = f" (request id {request_id})" if request_id else ""
    if status == 403:
        return InvokeError(f"HTTP 403 Forbidden: {message}; {FORBIDDEN_HINT}{suffix}", status)
    return InvokeError(f"HTTP {status}: {message}{suffix}", status)


def _error_message(body: bytes) -> str:
    """The function's ``{"error": {"code", "message"}}``, AWS's ``{"Message": ...}``, or the raw text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return f"{error.get('code', 'error')}: {error['message']}"
        for key in ("Message", "message"):
            if isinstance(data.get(key), str):
                return data[key]
    return text[:300]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def generate(
    url: str,
    prompt: str,
    *,
    region: str | None = None,
    credentials: Any = None,
    retry: RetryPolicy | None = None,
    session: Any = None,
    **fields: Any,
) -> GenerationResponse:
    """Generate. ``fields`` are the function's request fields (``num_inference_steps``, ``seed``,
    ``num_images``, ``init_image`` as base64, ...); None values are left out so the function applies its
    defaults. One image comes back as the binary response, several as the JSON one."""
    unknown = sorted(set(fields) - set(REQUEST_FIELDS))
    if unknown:
        raise InvokeError(
            f"unknown request field(s): {', '.join(unknown)} (known: {', '.join(REQUEST_FIELDS)})"
        )
    payload = {"prompt": prompt, **{name: value for name, value in fields.items() if value is not None}}
    client = FunctionUrlClient(
        url, region=region, credentials=credentials, retry=retry or RetryPolicy(), session=session
    )
    several = (payload.get("num_images") or 1) > 1
    body, headers, attempts = client.post(payload, accept="application/json" if several else "image/*")
    return GenerationResponse.from_http(body, headers, attempts)


# ---- sd-lambda generate ------------------------------------------------------------------------------


def image_paths(output: Path, count: int) -> list[Path]:
    """Where ``count`` images go: ``output`` for the first, then ``<stem>-1<suffix>``, ``-2``, ..."""
    return [output, *(output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(1, count))]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="call the function URL (SigV4-signed) and save the image(s)",
        description="Generate images through the IAM-protected function URL and save them (several: "
        "out.png, out-1.png, ...).",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the function URL (https://<id>.lambda-url.<region>.on.aws/)")
    where.add_argument("--infra", type=Path, help="read the URL from this Terraform root's outputs")
    add_request_options(parser)
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("out.png"),
        help="where to save the image (several: this, then <stem>-1<suffix>, <stem>-2<suffix>, ...)",
    )
    add_json_flag(parser)
    parser.add_argument("--region", help="signing region (default: parsed from the URL)")
    parser.add_argument("--profile", help="AWS profile (default: botocore's default chain)")
    parser.add_argument("--attempts", type=int, default=RetryPolicy.attempts, help="tries before giving up")
    parser.add_argument(
        "--job",
        action="store_true",
        help="run it as a job (POST /jobs, needs jobs_enabled in the stack): poll with backoff, then "
        "download the images; for work longer than a call should wait for",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="with --job: stop waiting after this long in total; the job keeps running "
        "(default: %(default)s)",
    )
    parser.set_defaults(func=run)


def finite_float(text: str) -> float:
    """argparse type: a float that JSON can carry (no NaN, no infinity)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def image_file_base64(text: str) -> str:
    """argparse type for --init-image: a file's bytes, base64-encoded as the request carries them."""
    try:
        return base64.b64encode(Path(text).read_bytes()).decode("ascii")
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror or exc}") from None


def lora_choice(text: str) -> dict[str, Any]:
    """argparse type for --lora: ``NAME=SCALE`` (``NAME`` alone: scale 1)."""
    name, sep, scale = text.partition("=")
    return {"name": name, "scale": finite_float(scale) if sep else 1.0}


_ARG_TYPES: dict[str, Callable[[str], Any]] = {"integer": int, "number": finite_float, "string": str}
# Fields the command line spells its own way: a file for the base64 image, one option per adapter.
_FIELD_OPTIONS: dict[str, dict[str, Any]] = {
    "init_image": {
        "type": image_file_base64,
        "metavar": "PATH",
        "help": "image-to-image: start from this PNG, JPEG or WebP file (sent base64-encoded)",
    },
    "loras": {
        "type": lora_choice,
        "action": "append",
        "metavar": "NAME=SCALE",
        "help": "apply this LoRA adapter (repeat for several; scale -2 to 2, default 1)",
    },
}


def add_request_options(parser: argparse.ArgumentParser) -> None:
    """One option per request field, with the field's own type, choices and description."""
    for name, spec in GenerationRequest.model_fields.items():
        options = _FIELD_OPTIONS.get(name) or {
            "type": _ARG_TYPES[type_name(spec)],
            "choices": choices(spec),
            "help": spec.description,
        }
        parser.add_argument(
            FLAGS.get(name, "--" + name.replace("_", "-")),
            dest=name,
            required=spec.is_required(),
            **options,
        )


def run(args: argparse.Namespace) -> int:
    from sd_lambda.cli import CommandError, ask_for, report
    from sd_lambda.ops.stack_outputs import output_for_command

    if args.attempts < 1:
        raise CommandError("--attempts must be at least 1")
    if not args.prompt.strip():
        raise CommandError(f"the prompt is empty: {ask_for('--prompt', 'a red fox')}")
    url = args.url or output_for_command(args.infra, "function_url", "--url")
    fields = {name: getattr(args, name) for name in REQUEST_FIELDS if name != "prompt"}
    print(
        f"==> POST {url} (an environment's first request loads the model: tens of seconds)",
        file=sys.stderr,
        flush=True,
    )
    try:
        credentials = default_credentials(args.profile)
        if args.job:
            response = _run_as_job(args, url, fields, credentials)
        else:
            response = generate(
                url,
                args.prompt,
                region=args.region,
                credentials=credentials,
                retry=RetryPolicy(attempts=args.attempts),
                **fields,
            )
    except InvokeError as exc:
        raise CommandError(str(exc)) from None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    paths = image_paths(args.output, len(response.images))
    for path, data in zip(paths, response.images, strict=True):
        path.write_bytes(data)
    document = {
        "image": str(args.output),
        "images": [
            {"path": str(path), "seed": seed, "bytes": len(data)}
            for path, seed, data in zip(paths, response.seeds, response.images, strict=True)
        ],
        "url": url,
        "content_type": response.content_type,
        "bytes": len(response.image),
        "seed": response.seed,
        "timings_ms": response.timings_ms,
        "model": response.model,
        "revision": response.revision,
        "request_id": response.request_id,
        "attempts": response.attempts,
    }
    wrote = "\n".join(
        f"wrote {path} ({response.content_type}, {len(data)} bytes)"
        for path, data in zip(paths, response.images, strict=True)
    )
    report(args, document, [wrote, response.summary()])
    if response.fallback:
        print(
            f"note: the function re-encoded the image ({response.fallback}) to fit Lambda's 6 MB limit",
            file=sys.stderr,
        )
    return 0


def _run_as_job(
    args: argparse.Namespace, url: str, fields: Mapping[str, Any], credentials: Any
) -> GenerationResponse:
    """``--job``: the same request through POST /jobs, with a progress line per poll on stderr."""
    from sd_lambda.cli import CommandError
    from sd_lambda.ops.job_client import PollPolicy, run_job

    if not args.job_timeout > 0:
        raise CommandError("--job-timeout must be a positive number of seconds")
    payload = {"prompt": args.prompt, **{name: value for name, value in fields.items() if value is not None}}
    return run_job(
        url,
        payload,
        region=args.region,
        credentials=credentials,
        retry=RetryPolicy(attempts=args.attempts),
        poll=PollPolicy(timeout_s=args.job_timeout),
        progress=lambda line: print(f"... {line}", file=sys.stderr, flush=True),
    )
