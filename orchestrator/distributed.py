"""The one place that calls ``torch.distributed`` collectives.

Every collective in Regimen goes through these functions. Each one places its tensor on
the process group's device (NCCL reduces only CUDA tensors, gloo only CPU ones) and hands
the result back on the caller's device, so a technique never has to know the backend.

Without an initialised process group, or with a world of one process, every function is
the identity (no communication). Inside :func:`force_collectives` (or with
``REGIMEN_FORCE_COLLECTIVES=1`` in the environment, which reaches Ray workers) they run
the real collective even at world size 1: a one-GPU NCCL test then takes the same path as
eight GPUs. A last check refuses to hand a tensor on the wrong device to the backend
(:class:`CollectiveDeviceError`), so a bug here fails loudly instead of hanging a job.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from orchestrator.errors import RegimenError

Op = Literal["sum", "max", "min"]

FORCE_ENV = "REGIMEN_FORCE_COLLECTIVES"

_forced_depth = 0


class CollectiveDeviceError(RegimenError):
    """A tensor on the wrong device was about to reach a collective (e.g. CPU on NCCL)."""


@dataclass(frozen=True)
class World:
    """This process's place in the default process group (rank 0 of 1 when there is none)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def initialised(self) -> bool:
        """Whether a ``torch.distributed`` process group exists."""
        return self.backend is not None


def world() -> World:
    """Rank, world size and backend of the default group; ``World()`` when not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(), backend=str(dist.get_backend()))


def join_world(backend: str, rank: int, world_size: int, timeout_minutes: float = 30) -> None:
    """Join the default process group from the ``env://`` rendezvous (``MASTER_ADDR``,
    ``MASTER_PORT`` set by the launcher); every rank of the world calls this together."""
    import datetime

    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def forced() -> bool:
    """Whether collectives run even at world size 1 (:func:`force_collectives` or the env)."""
    return _forced_depth > 0 or os.environ.get(FORCE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def force_collectives() -> Iterator[None]:
    """Run every collective inside the block even at world size 1 (tests, one-GPU checks)."""
    global _forced_depth
    _forced_depth += 1
    try:
        yield
    finally:
        _forced_depth -= 1


def _active(w: World) -> bool:
    return w.initialised and (w.size > 1 or forced())


def collective_device(backend: str | None = None) -> torch.device:
    """The device a collective's tensors must live on for ``backend`` (default: the group's).

    NCCL: this rank's current CUDA device (DeepSpeed and Ray Train select it with
    ``set_device(local_rank)``; ``torch.distributed``'s object collectives use the same
    rule). Every other backend (gloo, none): the CPU.
    """
    name = backend if backend is not None else world().backend
    if name != "nccl":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CollectiveDeviceError("an NCCL process group needs CUDA, and this process has none")
    return torch.device("cuda", torch.cuda.current_device())


def _check_device(tensor: torch.Tensor, w: World) -> None:
    """The guard in front of the backend: never hand it a tensor it cannot take."""
    want = collective_device(w.backend)
    if tensor.device.type != want.type or (
        want.type == "cuda" and tensor.device.index not in (None, want.index)
    ):
        raise CollectiveDeviceError(
            f"a {tensor.device} tensor was about to reach a {w.backend} collective, which needs "
            f"{want}: route the collective through orchestrator.distributed"
        )


def _reduce_op(op: Op) -> Any:
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"unknown reduce op {op!r}: use one of {sorted(ops)}")
    return ops[op]


def _on_group_device(tensor: torch.Tensor, w: World) -> torch.Tensor:
    """``tensor`` itself when it already lives on the group's device (and is contiguous, as
    the backends need), else a contiguous copy there."""
    want = collective_device(w.backend)
    if tensor.device.type == want.type and (want.type != "cuda" or tensor.device == want):
        return tensor if tensor.is_contiguous() else tensor.contiguous()
    return tensor.to(want).contiguous()


def _copy_back(tensor: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    if moved is not tensor:
        with torch.no_grad():  # a collective is not part of any autograd graph
            tensor.copy_(moved)
    return tensor


def all_reduce_(tensor: torch.Tensor, op: Op = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over all ranks in place (``sum``, ``max`` or ``min``); returns it."""
    w = world()
    if not _active(w):
        return tensor
    moved = _on_group_device(tensor, w)
    _check_device(moved, w)
    dist.all_reduce(moved, op=_reduce_op(op))
    return _copy_back(tensor, moved)


def all_reduce_floats(values: list[float], op: Op = "sum") -> list[float]:
    """Reduce a few floats over all ranks (in float64) so every rank sees the same numbers."""
    w = world()
    if not _active(w) or not values:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64)
    return [float(v) for v in all_reduce_(tensor, op).tolist()]


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s values (in place); returns it."""
    w = world()
    if not _active(w):
        return tensor
    moved = _on_group_device(tensor, w)
    _check_device(moved, w)
    dist.broadcast(moved, src=src)
    return _copy_back(tensor, moved)


def all_gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order, each on
    the caller's device."""
    w = world()
    if not _active(w):
        return [tensor]
    moved = _on_group_device(tensor, w)
    _check_device(moved, w)
    out = [torch.empty_like(moved) for _ in range(w.size)]
    dist.all_gather(out, moved)
    return [t.to(tensor.device) for t in out]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order (also a barrier when collectives run)."""
    w = world()
    if not _active(w):
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)  # torch moves the pickles to the group's device itself
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` elsewhere is ignored)."""
    w = world()
    if not _active(w):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


__all__ = [
    "FORCE_ENV",
    "CollectiveDeviceError",
    "World",
    "all_gather_objects",
    "all_gather_tensor",
    "all_reduce_",
    "all_reduce_floats",
    "broadcast_",
    "broadcast_object",
    "collective_device",
    "force_collectives",
    "forced",
    "world",
]
