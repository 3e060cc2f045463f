"""Run the real Lambda entrypoint locally: a Runtime API, a function URL front door, a launcher.

- ``runtime.RuntimeAPI``: the Lambda Runtime API of one execution environment on 127.0.0.1.
- ``launcher.LocalLambda``: ``python -m awslambdaric sd_lambda.serving.handler.handler`` as a subprocess
  pointed at that API (the image's exact command); ``invoke(event) -> InvocationResult``.
- ``frontdoor.FrontDoor``: plain HTTP -> function URL 2.0 events -> HTTP, bounded queue, 429 when full.
- ``playground``: the page the front door answers ``GET /`` with (``playground.html``; local only).
- ``cli``: ``sd-lambda serve`` and ``sd-lambda demo``.
"""
