"""Accelerations the engine may apply to a loaded pipeline, one module each.

Every module here changes how fast or how lean the same pipeline runs, never what it computes
beyond rounding; docs/performance.md says what each one measured and whether it is on by default.
Importing this package imports no torch (``prefetch`` runs before torch is imported).
"""
