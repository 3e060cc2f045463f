"""The Lambda entrypoint: ``python -m awslambdaric sd_lambda.serving.handler.handler`` (what the image runs).

Set up once, predict many. Importing this module (Lambda's init phase, capped at 10 s) reads the
settings, starts reading the current revision's weights in the background (``PREFETCH``, when
``SD_ACCEL`` selects ``prefetch``), and builds
the logger and an empty ``PREDICTOR``; the model itself is loaded by the first
request that needs it and then kept warm for every later invocation of this execution environment.

Stable names (the image and the local runtime rely on them):

- ``handler(event, context)``: a function URL payload 2.0 event -> a function URL result
  (``statusCode``/``headers``/``body``/``isBase64Encoded``); any other event is a direct invoke whose
  event is the request object itself -> a JSON object (``images`` [{``image``, ``seed``}], ``seed``,
  ``model``, ``timings``, or ``error`` + ``statusCode``); a job event (serving.jobs) runs a stored job.
- ``PREDICTOR``: the warm model holder; ``PREDICTOR.loads`` counts model loads in this environment.
- ``SETTINGS``: ``Settings.from_env()``; a malformed variable fails init with the variable's name.
- ``ENGINE``: the engine imported at init for the current release (torch, openvino; None if unseeded).
- ``PREFETCH``: the background read of ``current``'s weights started at init (None when off or unseeded).
"""

from __future__ import annotations

from typing import Any

from sd_lambda.engine.accel.prefetch import prefetch_current
from sd_lambda.engine.backend import import_expected_engine
from sd_lambda.settings import Settings

SETTINGS = Settings.from_env()
# Started before the engine's import below, which spends seconds of CPU (torch, diffusers, transformers)
# while the disk sits idle: reading the weights (from EFS on Lambda) overlaps it. Opt-in:
# SD_ACCEL=+prefetch (docs/performance.md says where it pays).
PREFETCH = prefetch_current(SETTINGS)
# The engine the current release needs (sd_lambda.engine.backend), imported in the init phase.
ENGINE = import_expected_engine(SETTINGS)

from aws_lambda_powertools import Logger  # noqa: E402  (after the prefetch has started, see above)
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers  # noqa: E402

from sd_lambda.serving.predictor import Predictor  # noqa: E402
from sd_lambda.serving.service import Service  # noqa: E402

logger = Logger(service="sd-lambda")
# The package's own stdlib loggers (the engine's load-time choices) write the same JSON lines.
copy_config_to_registered_loggers(source_logger=logger, include={"sd_lambda"})
PREDICTOR = Predictor(SETTINGS, prefetch=PREFETCH)
SERVICE = Service(SETTINGS, PREDICTOR, logger)


@logger.inject_lambda_context
def handler(event: Any, context: Any) -> dict[str, Any]:
    return SERVICE.handle(event, context)
