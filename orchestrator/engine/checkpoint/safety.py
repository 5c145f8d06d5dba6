"""What may go into a checkpoint and what may come out of one without running code.

DeepSpeed 0.19 reads its own files with ``weights_only=False`` (``TorchCheckpointEngine.load``
and the ZeRO shard loaders), i.e. with full pickle. Regimen never lets it: while
:meth:`CheckpointStore.load_engine` runs DeepSpeed's ``load_checkpoint``,
:func:`weights_only_loads` replaces the engine's checkpoint-engine ``load`` with
``torch.load(weights_only=True)`` allowing, beyond tensors and containers, only the classes in
:data:`DEEPSPEED_SAFE_GLOBALS` (``torch.serialization.safe_globals``), and sets
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` so that a ``torch.load`` DeepSpeed makes directly is
weights-only too. Before that, the store checks the directory against its SHA-256 manifest
(every file listed, nothing else there) and :func:`pickle_problem` scans every file, without
running it, for the globals it would import: a tampered checkpoint is refused with a clear
message before any of it is unpickled, and a forged manifest still cannot smuggle code in.
Regimen's own files are always written so that they load, and are read, with
``weights_only=True`` (:func:`check_weights_only`, :func:`load_weights_only`).
"""

from __future__ import annotations

import importlib
import io
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
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


def deepspeed_safe_globals() -> list[Any]:
    """The classes named by :data:`DEEPSPEED_SAFE_GLOBALS`, imported (for ``safe_globals``)."""
    out = []
    for name in sorted(DEEPSPEED_SAFE_GLOBALS):
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


# torch reads these on every torch.load; the second one would override (and clash with) the first.
_FORCE, _FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only_loads(checkpoint_engine: Any | None) -> Iterator[None]:
    """While active, ``checkpoint_engine.load`` (DeepSpeed's reader of its own files) and any
    other ``torch.load`` in this process use the weights-only unpickler, allowing beyond
    torch's own set only :data:`DEEPSPEED_SAFE_GLOBALS`; ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
    overrides even an explicit ``weights_only=False`` (DeepSpeed's ``zero_to_fp32``). A file
    that needs anything else raises ``pickle.UnpicklingError`` instead of running code.
    ``checkpoint_engine`` None: no engine to patch (reading a checkpoint without one)."""
    allowed = deepspeed_safe_globals()

    def load(path: str, map_location: Any = None) -> Any:
        return torch.load(path, map_location=map_location, weights_only=True)

    own = vars(checkpoint_engine) if checkpoint_engine is not None else {}
    had, previous = "load" in own, own.get("load")
    saved_env = {k: os.environ.pop(k, None) for k in (_FORCE, _FORCE_NOT)}
    if checkpoint_engine is not None:
        checkpoint_engine.load = load
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if checkpoint_engine is None:
            pass
        elif had:
            checkpoint_engine.load = previous
        else:
            del checkpoint_engine.load
        for key, value in saved_env.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def load_weights_only(data: bytes) -> Any:
    """``torch.load`` of ``data`` with ``weights_only=True`` onto the CPU."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
