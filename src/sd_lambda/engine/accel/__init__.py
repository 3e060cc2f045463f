"""Accelerations the engine may apply to a loaded pipeline, one module each, listed in ``registry``.

Every one changes how fast or how lean the pipeline runs, not what it computes beyond rounding, except
those the registry marks ``changes_image`` (feature reuse, opt-in); docs/performance.md says what each
one measured and whether it is on by default. Importing this package, ``registry`` or ``prefetch``
imports no torch (the settings parse ``SD_ACCEL`` and the prefetch runs before torch is imported).
"""
