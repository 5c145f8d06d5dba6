"""What may go into a checkpoint and what may come out of one without running code.

DeepSpeed 0.19 reads its own files with ``weights_only=False`` (``TorchCheckpointEngine.load``
and the ZeRO shard loaders), i.e. with full pickle, and it must: under torch 2.13 the ZeRO-1/2
optimizer shards pickle a ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` object and fail a
``weights_only=True`` load (the model-states file alone would pass). That is acceptable only
because the store first checks every file against the SHA-256 manifest written at save time
and :func:`pickle_problem` scans DeepSpeed's pickles, without running them, for the globals
they would import (anything beyond tensors and :data:`DEEPSPEED_SAFE_GLOBALS` is refused: a
forged manifest cannot smuggle code in), before DeepSpeed opens any of them.
Regimen's own files are always written so that they load, and are read, with
``weights_only=True`` (:func:`check_weights_only`, :func:`load_weights_only`).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import CheckpointError

_PRIMITIVES = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)
# The classes DeepSpeed 0.19's ZeRO 0/1/2 files reference beyond torch's weights-only set
# (read off real checkpoints with torch.serialization.get_unsafe_globals_in_checkpoint).
DEEPSPEED_SAFE_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def check_weights_only(obj: Any, where: str) -> None:
    """Raise CheckpointError unless ``obj`` would load with ``torch.load(weights_only=True)``."""
    t = type(obj)
    if t in _PRIMITIVES or t in (torch.Tensor, torch.nn.Parameter):
        return
    if t in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            check_weights_only(v, f"{where}[{i}]")
        return
    if t in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int, bool, float, type(None)):
                raise CheckpointError(f"{where}: dict key {k!r} ({type(k).__name__}) not allowed")
            check_weights_only(v, f"{where}[{k!r}]")
        return
    raise CheckpointError(
        f"{where}: {t.__module__}.{t.__qualname__} cannot be checkpointed: it may hold only "
        "tensors, None/bool/int/float/str/bytes, lists, tuples and dicts (so that it loads with "
        "torch.load(weights_only=True)); convert it, e.g. numpy -> torch.tensor / .tolist(), "
        "numpy scalar -> float(), set -> sorted list, an object -> its state_dict()"
    )


def pickle_problem(path: Path) -> str | None:
    """Why DeepSpeed's file ``path`` must not be unpickled, or None when it is safe to.

    Scans the pickle without executing it: unreadable files and files that would import
    anything outside torch's weights-only set and :data:`DEEPSPEED_SAFE_GLOBALS` are refused.
    """
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:
        return f"{path} is not a readable torch file ({e})"
    unknown = sorted(set(found) - DEEPSPEED_SAFE_GLOBALS)
    if unknown:
        return (
            f"{path} would import {', '.join(unknown)} when loaded, which no "
            "DeepSpeed checkpoint does (refusing to unpickle it)"
        )
    return None


def load_weights_only(data: bytes) -> Any:
    """``torch.load`` of ``data`` with ``weights_only=True`` onto the CPU."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
