"""Offline helpers for tests, the demo and the benchmark (no network, no downloads)."""
