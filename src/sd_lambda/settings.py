"""Configuration from the environment, in one place.

Every knob the Lambda (or a local run) reads is a field here, with its environment variable name
and default. Nothing else in the package reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sd_lambda.engine.accel import registry
from sd_lambda.engine.generation import DECODERS, SCHEDULERS
from sd_lambda.layout import ENGINES

# Lambda caps a synchronous response (and a function URL's request) at 6 MB.
LAMBDA_PAYLOAD_BYTES = 6_000_000
# A request body holds the init image base64-encoded plus every other field (prompts and all): this much
# room for the latter is kept beside SD_MAX_INIT_IMAGE_BYTES within SD_MAX_REQUEST_BYTES.
REQUEST_FIELDS_BYTES = 64 * 1024
# SD_JOBS_PREFIX: S3 key segments, each ending in / (the IAM policy grants exactly <prefix>*).
JOBS_PREFIX = re.compile(r"(?:[A-Za-z0-9._-]+/)+")
# Variables SD_ACCEL replaced: a stack that still sets one would silently get the SD_ACCEL defaults.
# variable -> (the values that meant what SD_ACCEL's defaults now do, the SD_ACCEL change for any other).
RETIRED_VARIABLES: Mapping[str, tuple[tuple[str, ...], str]] = {
    "SD_PREFETCH": (("0",), "+prefetch"),
    "SD_MALLOC_TUNE": (("0",), "+heap_keep,-heap_trim"),
    "SD_SMALL_MAP_CONVS": (("1",), "-small_map_convs"),
    "SD_BF16_COPY": (("0",), "+bf16_copy"),
    "SD_FEATURE_REUSE": (("1",), "+feature_reuse"),
}


def base64_size(raw_bytes: int) -> int:
    """Length of ``raw_bytes`` bytes base64-encoded (with padding)."""
    return 4 * ((raw_bytes + 2) // 3)


def refuse_retired(environ: Mapping[str, str]) -> None:
    """ValueError naming the SD_ACCEL equivalent of the first retired variable ``environ`` sets."""
    for name, (defaults, change) in RETIRED_VARIABLES.items():
        value = environ.get(name)
        if not value:  # empty is unset, as for every variable here
            continue
        if value.strip() in defaults:
            raise ValueError(
                f"{name} was retired: unset it (SD_ACCEL's defaults already do what {value} did)"
            )
        raise ValueError(f"{name} was retired: use SD_ACCEL={change}")


def _env(
    name: str,
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    ge: int | None = None,
    le: int | None = None,
) -> Any:
    return field(
        default=default, metadata={"env": name, "help": help, "choices": choices, "ge": ge, "le": le}
    )


@dataclass(frozen=True)
class Settings:
    model_root: Path = _env("MODEL_ROOT", Path("/mnt/models"), "Where the EFS access point is mounted.")
    model_name: str = _env(
        "MODEL_NAME", "default", "Model folder under MODEL_ROOT (a slug such as segmind--tiny-sd)."
    )
    max_steps: int = _env("SD_MAX_STEPS", 50, "Upper bound for num_inference_steps.", ge=1)
    max_side: int = _env("SD_MAX_SIDE", 1024, "Upper bound for width and height, in pixels.", ge=8)
    max_pixels: int = _env(
        "SD_MAX_PIXELS",
        768 * 768,
        "Upper bound for width x height, so one request cannot exhaust memory.",
        ge=64,
    )
    max_prompt_chars: int = _env("SD_MAX_PROMPT_CHARS", 2000, "Upper bound for prompt length.", ge=1)
    dtype: str = _env(
        "SD_DTYPE",
        "auto",
        "auto (bf16 only with native CPU support), float32 or bfloat16.",
        choices=("auto", "float32", "bfloat16"),
    )
    threads: int = _env(
        "SD_THREADS",
        0,
        "Engine threads (torch intra-op, OpenVINO's); 0 = the CPUs this process may use.",
        ge=0,
    )
    default_decoder: str = _env(
        "SD_DEFAULT_DECODER", "auto", "auto (tiny when present), full or tiny.", choices=("auto", *DECODERS)
    )
    default_scheduler: str = _env(
        "SD_DEFAULT_SCHEDULER",
        "auto",
        "auto (the model's own; PNDM becomes dpmpp_2m on torch, euler on OpenVINO), model, or a name.",
        choices=("auto", "model", *SCHEDULERS),
    )
    engine: str = _env(
        "SD_ENGINE",
        "auto",
        "auto (what the release holds: OpenVINO IR -> openvino, else torch), torch or openvino.",
        choices=("auto", *ENGINES),
    )
    openvino_cache_dir: str = _env(
        "SD_OPENVINO_CACHE_DIR",
        "/tmp/openvino-cache",
        "OpenVINO engine: where compiled models are cached (Lambda can write only /tmp); none = no cache.",
    )
    openvino_compiled_sizes: int = _env(
        "SD_OPENVINO_COMPILED_SIZES",
        1,
        "OpenVINO engine: compiled request shapes (size, guidance) kept in memory, the oldest dropped "
        "first; each SD 1.5 shape holds ~4 GB of compiled weights.",
        ge=1,
        le=8,
    )
    accel: str = _env(
        "SD_ACCEL",
        "default",
        "Accelerations (sd_lambda.engine.accel.registry): " + registry.SWITCH_HELP + ".",
    )
    max_images: int = _env("SD_MAX_IMAGES", 4, "Upper bound for num_images (one UNet batch).", ge=1, le=16)
    max_init_image_bytes: int = _env(
        "SD_MAX_INIT_IMAGE_BYTES",
        4_000_000,
        "Largest init_image accepted, in bytes after base64 decoding; else 413. Its base64 form plus "
        f"{REQUEST_FIELDS_BYTES} bytes for the other fields must fit SD_MAX_REQUEST_BYTES (checked at init).",
        ge=1024,
    )
    max_loras: int = _env(
        "SD_MAX_LORAS", 3, "Upper bound for the LoRA adapters one request applies.", ge=0, le=8
    )
    max_request_bytes: int = _env(
        "SD_MAX_REQUEST_BYTES",
        LAMBDA_PAYLOAD_BYTES,
        "Largest request body accepted (after base64 decoding); else 413. Lambda refuses bodies over 6 MB "
        "itself; room for SD_MAX_INIT_IMAGE_BYTES is checked at init.",
        ge=1024,
        le=LAMBDA_PAYLOAD_BYTES,
    )
    max_response_bytes: int = _env(
        "SD_MAX_RESPONSE_BYTES",
        LAMBDA_PAYLOAD_BYTES,
        "Largest response the handler returns (Lambda caps responses at 6 MB); else a fallback or 413.",
        ge=1024,
        le=LAMBDA_PAYLOAD_BYTES,
    )
    jobs_bucket: str = _env(
        "SD_JOBS_BUCKET",
        "",
        "Jobs (POST /jobs, GET /jobs/{id}): the S3 bucket of requests and results; empty = jobs off "
        "(Terraform sets it with jobs_enabled = true).",
    )
    jobs_prefix: str = _env(
        "SD_JOBS_PREFIX", "jobs/", "Jobs: key prefix of every job object (the function may write only there)."
    )
    jobs_url_ttl: int = _env(
        "SD_JOBS_URL_TTL",
        900,
        "Jobs: seconds a result image's presigned URL stays valid (each GET /jobs/{id} signs new ones).",
        ge=60,
        le=3600,
    )
    jobs_max_event_age: int = _env(
        "SD_JOBS_MAX_EVENT_AGE",
        3600,
        "Jobs: seconds Lambda keeps a job's event queued (Terraform: jobs_maximum_event_age_seconds); a "
        "job queued longer is reported failed.",
        ge=60,
        le=21600,
    )
    jobs_lambda_endpoint: str = _env(
        "SD_JOBS_LAMBDA_ENDPOINT",
        "",
        "Jobs: Lambda API endpoint URL for starting a job (the stack's interface endpoint); empty = the "
        "region's public endpoint.",
    )

    def __post_init__(self) -> None:
        """Refuse a value outside its declared choices or range, naming the environment variable."""
        for f in fields(self):
            value, env = getattr(self, f.name), f.metadata["env"]
            choices, low, high = f.metadata["choices"], f.metadata["ge"], f.metadata["le"]
            if choices is not None and value not in choices:
                raise ValueError(f"{env}={value!r} is not one of {', '.join(choices)}")
            if low is not None and value < low:
                raise ValueError(f"{env}={value!r} is below the minimum {low}")
            if high is not None and value > high:
                raise ValueError(f"{env}={value!r} is above the maximum {high}")
        registry.resolve(self.accel)  # an unknown name fails here, naming the known ones
        if not JOBS_PREFIX.fullmatch(self.jobs_prefix):
            raise ValueError(
                f"SD_JOBS_PREFIX={self.jobs_prefix!r} must be one or more key segments ending in / "
                "(letters, digits, '.', '_', '-'), e.g. jobs/"
            )
        needed = base64_size(self.max_init_image_bytes) + REQUEST_FIELDS_BYTES
        if needed > self.max_request_bytes:
            # Otherwise an init image under its own limit would be refused as request_too_large.
            raise ValueError(
                f"SD_MAX_INIT_IMAGE_BYTES={self.max_init_image_bytes} needs a request body of {needed} "
                f"bytes (base64 plus {REQUEST_FIELDS_BYTES} for the other fields), over "
                f"SD_MAX_REQUEST_BYTES={self.max_request_bytes}: lower the first or raise the second "
                f"(at most {LAMBDA_PAYLOAD_BYTES})"
            )

    @property
    def accelerations(self) -> tuple[str, ...]:
        """The accelerations ``SD_ACCEL`` selects, in the order the engine applies them."""
        return registry.resolve(self.accel)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        refuse_retired(environ)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(raw)
            except ValueError as exc:
                raise ValueError(f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from exc
        return cls(**values)

    @property
    def model_dir(self) -> Path:
        return self.model_root / self.model_name


def documented_variables() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) rows, for README and --help output."""
    return [(f.metadata["env"], str(f.default), f.metadata["help"]) for f in fields(Settings)]
