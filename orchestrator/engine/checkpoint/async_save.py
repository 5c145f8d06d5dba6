"""Asynchronous saves: a host-memory snapshot taken while training waits, written later.

Training is blocked only while ``engine.save_checkpoint`` runs with a *capturing* checkpoint
engine swapped in (:func:`snapshot`), which deep-copies every state dict DeepSpeed hands to
``save()`` into host memory (``copy.deepcopy`` on CPU keeps storage sharing, so the bytes
written later are the bytes the synchronous path writes; CUDA tensors are copied to the CPU)
instead of writing it. A background thread per rank then calls the real engine's ``save()``
with the same paths, writes the rank state, fsyncs, and drops a ``.done`` marker
(:func:`write_rank_files`); rank 0's thread waits for every rank's marker
(:func:`wait_for_ranks`), then the store commits exactly as the synchronous path does (hash,
manifest, rename: the commit is the last step). DeepSpeed 0.19's own
``checkpoint.writer.decoupled`` engine is not used: it needs the async-I/O op
(``FastCheckpointEngine``) and commits on a later ``engine.step()``, outside the store's
manifest protocol.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.engine.checkpoint.io import (
    CheckpointInfo,
    atomic_write_json,
    write_error,
    write_rank_state,
)
from orchestrator.errors import CheckpointError

DONE_DIR = ".done"  # per-rank "my files are written" markers of an async save, removed at commit
ASYNC_TIMEOUT_S = 1800.0  # rank 0 gives up waiting for other ranks' async writes after this


class HostPool:
    """Host buffers for snapshots, reused from save to save: the same state has the same
    storage sizes each time, and fresh memory costs page faults (CPU) or pinning (CUDA, where
    pinned buffers make the device-to-host copy fast and asynchronous) far above the copy
    itself. ``take`` lends a buffer, ``give_back`` returns a written save's buffers."""

    def __init__(self) -> None:
        self.free: dict[tuple[int, bool], list[torch.UntypedStorage]] = {}
        self.lent: list[tuple[tuple[int, bool], torch.UntypedStorage]] = []

    def take(self, nbytes: int, pin: bool = False) -> torch.UntypedStorage:
        """A host storage of ``nbytes`` bytes (page-locked when ``pin``)."""
        key = (nbytes, pin)
        spare = self.free.get(key)
        buf = spare.pop() if spare else None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).untyped_storage()
        self.lent.append((key, buf))
        return buf

    @property
    def pinned_lent(self) -> bool:
        """Whether a lent buffer is page-locked (its copy may still be in flight)."""
        return any(pin for (_, pin), _ in self.lent)

    def give_back(self) -> None:
        """Every lent buffer is free again (their save has been written)."""
        for key, buf in self.lent:
            self.free.setdefault(key, []).append(buf)
        self.lent = []


def host_copy(obj: Any, memo: dict[int, Any] | None = None, pool: HostPool | None = None) -> Any:
    """A copy of ``obj`` in host memory that ``torch.save`` serialises to the same bytes.

    Tensors sharing a storage keep sharing one (copied) storage with the same offsets,
    strides, ``requires_grad`` and ``nn.Parameter`` type; containers are rebuilt, anything
    else is ``copy.deepcopy``-ed. Accelerator tensors land on the CPU (their files then record
    the CPU as location; DeepSpeed loads with ``map_location``).
    """
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            return copy.deepcopy(obj.detach())
        src = obj.untyped_storage()
        dst = memo.get(src._cdata)
        if dst is None:
            on_cpu = src.device.type == "cpu"
            if pool is not None:  # reused buffers; from an accelerator pinned + asynchronous
                dst = pool.take(src.nbytes(), pin=not on_cpu)
                dst.copy_(src, non_blocking=not on_cpu)  # the caller synchronizes
            else:
                dst = src.clone() if on_cpu else src.cpu()
            memo[src._cdata] = dst
        new = torch.empty(0, dtype=obj.dtype, device=dst.device)
        new.set_(dst, obj.storage_offset(), obj.size(), obj.stride())
        if type(obj) is torch.nn.Parameter:
            return torch.nn.Parameter(new, requires_grad=obj.requires_grad)
        return new.requires_grad_(obj.requires_grad)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type and instance attributes (state_dict._metadata)
        for k, v in list(obj.items()):
            out[k] = host_copy(v, memo, pool)
        if getattr(obj, "__dict__", None):
            out.__dict__ = copy.deepcopy(obj.__dict__)
        return out
    if isinstance(obj, list):
        return [host_copy(v, memo, pool) for v in obj]
    if isinstance(obj, tuple):
        items = [host_copy(v, memo, pool) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy.deepcopy(obj)


class _CaptureEngine:
    """Stands in for DeepSpeed's checkpoint engine during ``save_checkpoint``: directories are
    made at once, state dicts are copied to host memory and kept for the background writer."""

    def __init__(self, real: Any, pool: HostPool | None = None):
        self.real = real
        self.pool = pool
        self.captured: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:  # is_data_parallel_writer, load, ...
        return getattr(self.real, name)

    def create(self, info: Any) -> None:
        self.real.create(info)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.real.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        self.captured.append((str(path), host_copy(state_dict, pool=self.pool)))

    def commit(self, info: Any) -> bool:
        return True  # Regimen's manifest rename is the commit

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        return bool(self.real.preserves_storage_sharing())


@dataclass
class PendingSave:
    """An asynchronous save in flight on this rank (see ``CheckpointStore.save_async``)."""

    step: int
    tmp: Path
    thread: threading.Thread
    blocked_s: float
    error: str | None = None
    info: CheckpointInfo | None = None
    started: float = 0.0
    finished: float = 0.0


def snapshot(
    engine: Any, tmp: Path, tag: str, rank_state: dict[str, Any], pool: HostPool
) -> tuple[Any, list[tuple[str, Any]], dict[str, Any]]:
    """Run ``engine.save_checkpoint`` into host memory instead of ``tmp``.

    Returns the real checkpoint engine, the captured ``(path, state)`` files and a host copy
    of ``rank_state``; the buffers are borrowed from ``pool`` until the save is written.
    """
    real = engine.checkpoint_engine
    if not hasattr(real, "save") or type(real).__name__ != "TorchCheckpointEngine":
        raise CheckpointError(
            f"checkpoint.async needs DeepSpeed's default TorchCheckpointEngine, the engine "
            f"uses {type(real).__name__}: drop the DeepSpeed checkpoint.writer settings"
        )
    capture = _CaptureEngine(real, pool)
    engine.checkpoint_engine = capture
    try:
        engine.save_checkpoint(str(tmp), tag=tag, save_latest=False)
    except BaseException:
        pool.give_back()
        raise
    finally:
        engine.checkpoint_engine = real
    own_state = host_copy(rank_state)
    if pool.pinned_lent:  # the device-to-host copies were issued asynchronously
        torch.cuda.synchronize()
    return real, capture.captured, own_state


def write_file(real_engine: Any, state: Any, path: str) -> None:
    """The background writer's unit of work: the real engine's ``save`` + fsync."""
    real_engine.save(state, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_rank_files(
    pending: PendingSave,
    real: Any,
    files: list[tuple[str, Any]],
    rank_state: dict[str, Any],
    rank: int,
) -> str | None:
    """Write this rank's captured files and rank state, then its ``.done`` marker.

    Returns this rank's error message, or None; the marker carries it to rank 0.
    """
    tmp, done = pending.tmp, pending.tmp / DONE_DIR
    try:
        for path, state in files:
            write_file(real, state, path)
        write_rank_state(rank_state, tmp / "regimen" / f"rank{rank:05d}.pt")
        err = None
    except Exception as e:
        err = f"rank {rank}: " + write_error(tmp, pending.step, e)
    files.clear()  # free the host copy
    try:
        done.mkdir(parents=True, exist_ok=True)
        atomic_write_json(done / f"rank{rank:05d}.json", {"error": err})
    except OSError as e:
        err = err or f"rank {rank} cannot mark checkpoint {pending.step} written: {e}"
    return err


def wait_for_ranks(pending: PendingSave, world_size: int) -> str | None:
    """Rank 0: wait for every rank's ``.done`` marker; the first rank's error, or None."""
    done = pending.tmp / DONE_DIR
    deadline = time.monotonic() + ASYNC_TIMEOUT_S
    errors: list[str] = []
    for r in range(world_size):
        marker = done / f"rank{r:05d}.json"
        while not marker.exists():
            if time.monotonic() > deadline:
                return f"checkpoint {pending.step}: rank {r} did not finish writing in time"
            time.sleep(0.01)
        got = json.loads(marker.read_text()).get("error")
        if got:
            errors.append(got)
    if errors:
        return errors[0] + f"; checkpoint {pending.step} was not committed"
    return None
