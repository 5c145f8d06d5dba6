"""Imports every technique module so that each registers itself. Add new ones here."""

from orchestrator.continual import technique as _continual  # noqa: F401
from orchestrator.techniques import (  # noqa: F401
    dropout,
    fault_injection,
    lisa,
    sgg,
    spike_guard,
    warmup,
)
