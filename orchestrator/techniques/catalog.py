"""Imports every technique module so that each registers itself. Add new ones here."""

from orchestrator.techniques import warmup  # noqa: F401
