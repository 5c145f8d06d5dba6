"""Imports every technique module so that each registers itself. Add new ones here."""

from orchestrator.continual import technique as _continual  # noqa: F401
from orchestrator.techniques import warmup  # noqa: F401
from orchestrator.techniques import dropout  # noqa: F401
from orchestrator.techniques import fault_injection, spike_guard  # noqa: F401
from orchestrator.techniques import sgg  # noqa: F401
from orchestrator.techniques import lisa  # noqa: F401
