"""Atomic, verified checkpoints of DeepSpeed engines.

- :mod:`.io`: atomic writes, fsync, the SHA-256 manifest and its checks, write-error messages;
- :mod:`.safety`: what a rank state may hold (``weights_only``) and the scan of DeepSpeed's
  pickles before they are loaded;
- :mod:`.async_save`: the host-memory snapshot and the background writer of async saves;
- :mod:`.store`: :class:`CheckpointStore`, the collective save / list / load / retention.
"""

from __future__ import annotations

from orchestrator.engine.checkpoint.async_save import PendingSave
from orchestrator.engine.checkpoint.io import CheckpointInfo, atomic_write_bytes, atomic_write_json
from orchestrator.engine.checkpoint.safety import DEEPSPEED_SAFE_GLOBALS
from orchestrator.engine.checkpoint.store import CheckpointStore

__all__ = [
    "DEEPSPEED_SAFE_GLOBALS",
    "CheckpointInfo",
    "CheckpointStore",
    "PendingSave",
    "atomic_write_bytes",
    "atomic_write_json",
]
