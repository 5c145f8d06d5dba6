"""Atomic, verified checkpoints of DeepSpeed engines.

- :mod:`.io`: atomic writes, fsync, the SHA-256 manifest and its checks (the directory must
  hold exactly the manifest's files, no links), write-error messages;
- :mod:`.safety`: what a rank state may hold (``weights_only``), the scan of DeepSpeed's
  pickles before they are loaded and the weights-only unpickler DeepSpeed loads them with;
- :mod:`.async_save`: the host-memory snapshot and the background writer of async saves;
- :mod:`.store`: :class:`CheckpointStore`, the collective save / list / load / retention.

The promise: nothing in a checkpoint directory runs code when it is loaded. A checkpoint is
loaded only if every file below its directory is listed in its manifest with a matching size
and SHA-256, every listed file is there, and nothing is a symbolic link; otherwise it is
refused with a CheckpointError naming the file. Even then nothing is unpickled with full
pickle: Regimen's files and DeepSpeed's are read with ``torch.load(weights_only=True)``.
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
