"""Serving: the Lambda entry point and everything between a function URL event and the engine.

``handler`` (the image's CMD) → ``service`` (HTTP: events, errors, encoding, response limits) →
``predictor`` (set up once from the EFS layout, predict many) → ``sd_lambda.engine``. ``request``
declares every request field once; validation, defaults, errors and docs/api.md all come from it.
Needs the ``runtime`` extra; ``request``, ``errors`` and ``events`` import without torch.
"""
