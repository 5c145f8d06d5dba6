"""Atomic, verified checkpoints of DeepSpeed engines.

Layout of one committed checkpoint ``root/step-00000100/``::

    ds/...                     DeepSpeed's own files (``engine.save_checkpoint(tmp, tag="ds")``):
                               model states + one ZeRO optimizer shard per rank
    regimen/rank00000.pt       each rank's ``rank_state`` (techniques, data sampler, RNG, ...)
    manifest.json              {format, step, world_size, created, meta,
                                files: {relpath: {sha256, bytes}}}, written last

A save writes everything into ``root/.tmp-step-00000100``, fsyncs it, writes the
manifest last and renames the directory into place, so a crash at any point
leaves either the complete checkpoint or nothing that :meth:`CheckpointStore.list`
would return. Leftover ``.tmp-*`` directories are removed by the next save.

Loading and ``weights_only``: DeepSpeed 0.19 reads its own files with
``weights_only=False`` (``TorchCheckpointEngine.load`` and the
ZeRO shard loaders), i.e. with full pickle, and it must: under torch 2.13 the ZeRO-1/2
optimizer shards pickle a ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` object and
fail a ``weights_only=True`` load (the model-states file alone would pass). That is
acceptable only because :meth:`CheckpointStore.load_engine` first checks every file
against the SHA-256 manifest written at save time and scans DeepSpeed's pickles, without
running them, for the globals they would import (anything beyond tensors and
:data:`DEEPSPEED_SAFE_GLOBALS` is refused: a forged manifest cannot smuggle code in),
before DeepSpeed opens any of them.
Regimen's own files are always read with ``weights_only=True``.

The store assumes a filesystem shared by all ranks (rank 0 hashes every rank's
files) and DeepSpeed's default ``TorchCheckpointEngine``.

Asynchronous saves (:meth:`CheckpointStore.save_async`, recipe ``checkpoint.async: true``):
training is blocked only while ``engine.save_checkpoint`` runs with a *capturing* checkpoint
engine swapped in, which deep-copies every state dict DeepSpeed hands to ``save()`` into host
memory (``copy.deepcopy`` on CPU keeps storage sharing, so the bytes written later are the
bytes the synchronous path writes; CUDA tensors are copied to the CPU) instead of writing it.
A background thread per rank then calls the real engine's ``save()`` with the same paths,
writes the rank state, fsyncs, and drops a ``.done`` marker; rank 0's thread waits for every
rank's marker, then commits exactly as the synchronous path does (hash, manifest, rename: the
commit is the last step). At most one save is in flight: the next save, a rollback, a resume
and the end of training call :meth:`CheckpointStore.wait` first. Until the rename the
checkpoint is a ``.tmp-*`` directory that :meth:`CheckpointStore.list` never returns, so a
crash mid-write leaves nothing loadable. DeepSpeed 0.19's own ``checkpoint.writer.decoupled``
engine is not used: it needs the async-I/O op (``FastCheckpointEngine``) and commits on a later
``engine.step()``, outside this store's manifest protocol.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import logging
import os
import re
import resource
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.distributed import all_gather_objects, world
from orchestrator.errors import CheckpointError

__all__ = [
    "CheckpointInfo",
    "CheckpointStore",
    "PendingSave",
    "atomic_write_bytes",
    "atomic_write_json",
]

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
DS_TAG = "ds"
DONE_DIR = ".done"  # per-rank "my files are written" markers of an async save, removed at commit
ASYNC_TIMEOUT_S = 1800.0  # rank 0 gives up waiting for other ranks' async writes after this
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_Paths = list[Path]
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, replace, fsync."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically (atomic_write_bytes)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise CheckpointError unless ``obj`` would load with ``torch.load(weights_only=True)``."""
    t = type(obj)
    if t in _PRIMITIVES or t in (torch.Tensor, torch.nn.Parameter):
        return
    if t in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    if t in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int, bool, float, type(None)):
                raise CheckpointError(f"{where}: dict key {k!r} ({type(k).__name__}) not allowed")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    raise CheckpointError(
        f"{where}: {t.__module__}.{t.__qualname__} cannot be checkpointed: it may hold only "
        "tensors, None/bool/int/float/str/bytes, lists, tuples and dicts (so that it loads with "
        "torch.load(weights_only=True)); convert it, e.g. numpy -> torch.tensor / .tolist(), "
        "numpy scalar -> float(), set -> sorted list, an object -> its state_dict()"
    )


def _sha256(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
        os.fsync(f.fileno())
    return h.hexdigest(), n


def _gather(obj: Any) -> list[Any]:
    """All-gather a small picklable object; also a barrier. Identity without torch.distributed."""
    return all_gather_objects(obj)


def _raise_first(errors: list[str | None]) -> None:
    for i, e in enumerate(errors):
        if e is not None:
            raise CheckpointError(e if len(errors) == 1 else f"rank {i}: {e}")


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint: its step, its directory and its parsed manifest."""

    step: int
    path: Path
    manifest: dict


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


def _host_copy(obj: Any, memo: dict[int, Any] | None = None, pool: HostPool | None = None) -> Any:
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
            out[k] = _host_copy(v, memo, pool)
        if getattr(obj, "__dict__", None):
            out.__dict__ = copy.deepcopy(obj.__dict__)
        return out
    if isinstance(obj, list):
        return [_host_copy(v, memo, pool) for v in obj]
    if isinstance(obj, tuple):
        items = [_host_copy(v, memo, pool) for v in obj]
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
        self.captured.append((str(path), _host_copy(state_dict, pool=self.pool)))

    def commit(self, info: Any) -> bool:
        return True  # Regimen's manifest rename is the commit

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        return bool(self.real.preserves_storage_sharing())


def _write_file(real_engine: Any, state: Any, path: str) -> None:
    """The background writer's unit of work: the real engine's ``save`` + fsync."""
    real_engine.save(state, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as torch's zip writer reports it (``unexpected pos`` on a short
    write) when the filesystem has no room left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(exc)
    return "No space left" in text or "unexpected pos" in text or "file too large" in text.lower()


def _write_error(tmp: Path, step: int, exc: BaseException) -> str:
    """The message for a checkpoint whose files could not be written."""
    where = tmp.parent
    fsize_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    efbig = isinstance(exc, OSError) and exc.errno == errno.EFBIG
    if efbig or (_disk_full(exc) and fsize_limit != resource.RLIM_INFINITY):
        return (
            f"checkpoint {step} was not written under {where}: file too large for this "
            f"process's file-size limit (ulimit -f: {fsize_limit} bytes). The previous "
            "checkpoints are untouched; raise the limit, then `regimen resume` the run"
        )
    if _disk_full(exc):
        free = shutil.disk_usage(where).free if where.exists() else 0
        return (
            f"checkpoint {step} was not written: disk full under {where} ({free} bytes free). "
            "The previous checkpoints are untouched; free space or lower checkpoint.keep, "
            "then `regimen resume` the run"
        )
    return (
        f"checkpoint {step} was not written to {tmp} ({type(exc).__name__}: {exc}); "
        "the previous checkpoints are untouched"
    )


def _write_rank_state(rank_state: dict[str, Any], own: Path) -> None:
    own.parent.mkdir(parents=True, exist_ok=True)
    with open(own, "wb") as f:
        torch.save(rank_state, f)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class PendingSave:
    """An asynchronous save in flight on this rank (see :meth:`CheckpointStore.save_async`)."""

    step: int
    tmp: Path
    thread: threading.Thread
    blocked_s: float
    error: str | None = None
    info: CheckpointInfo | None = None
    started: float = 0.0
    finished: float = 0.0


class CheckpointStore:
    """Atomic checkpoints under `root`: temp dir, fsync, manifest with SHA-256, rename; retention.

    ``save`` and ``load_engine`` are collective: every rank must call them, in the same
    order, with the same step. ``keep`` newest checkpoints survive retention (0 keeps all),
    plus any step for which ``protect(step)`` is True (e.g. the spike guard's rollback target).
    """

    def __init__(
        self,
        root: str | Path,
        keep: int = 3,
        *,
        rank: int = 0,
        world_size: int = 1,
        protect: Callable[[int], bool] | None = None,
        on_commit: Callable[[CheckpointInfo, list[int]], None] | None = None,
    ) -> None:
        if keep < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad CheckpointStore args: keep={keep}, rank={rank}/{world_size}")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.protect = protect
        self.on_commit = on_commit  # rank 0, after commit + retention: (info, steps removed)
        self.pending: PendingSave | None = None
        self._pool = HostPool()
        self.last_blocked_s = 0.0  # how long the latest save held the training thread
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def path_of(self, step: int) -> Path:
        """Where checkpoint ``step`` lives once committed."""
        return self._dir(step)

    def _check_world(self) -> str | None:
        w, mine = world(), (self.rank, self.world_size)
        if not w.initialised or (w.rank, w.size) == mine:
            return None
        return f"store is rank/world {mine}, torch.distributed {w.rank, w.size}"

    def save(
        self, engine: Any, step: int, rank_state: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> CheckpointInfo:
        """Collectively save ``engine`` + this rank's ``rank_state`` as checkpoint ``step``.

        Every rank must call it. ``rank_state`` may hold only tensors, None/bool/int/float/
        str/bytes, lists, tuples and dicts (exact types; numpy values are rejected) so that it
        loads with ``torch.load(weights_only=True)``; anything else raises CheckpointError on
        all ranks before anything is written. ``meta`` must be JSON-serialisable; it lands in
        the manifest. Re-saving an existing step replaces it. Returns the committed info.
        """
        self.wait()
        started = time.perf_counter()
        tmp, meta_d = self._prepare(engine, step, rank_state, meta)
        own = tmp / "regimen" / f"rank{self.rank:05d}.pt"
        try:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
            _write_rank_state(rank_state, own)
            err = None
        except Exception as e:  # shared below, so no rank is left waiting in a collective
            err = _write_error(tmp, step, e)
        _raise_first(_gather(err))

        manifest: dict[str, Any] | None = None
        if self.rank == 0:
            try:
                manifest = self._commit(tmp, step, meta_d)
                err = None
            except Exception as e:
                err = f"checkpoint {step} was not committed ({type(e).__name__}: {e}); "
                err += f"the previous checkpoints are untouched, {tmp} is left for cleanup"
        if manifest is not None:
            err = self._after_commit(CheckpointInfo(step, self._dir(step), manifest))
        results = _gather((err, manifest))
        _raise_first([e for e, _ in results])
        info = CheckpointInfo(step, self._dir(step), results[0][1])
        self.last_blocked_s = time.perf_counter() - started
        return info

    def _prepare(
        self, engine: Any, step: int, rank_state: dict[str, Any], meta: dict[str, Any] | None
    ) -> tuple[Path, dict[str, Any]]:
        """Checks shared by every rank before anything is written (collective); the temp dir."""
        tmp = self.root / f".tmp-step-{step:08d}"
        err = self._check_world()
        meta_d: dict[str, Any] = {}
        try:
            if not isinstance(step, int) or step < 0:
                raise CheckpointError(f"checkpoint step must be an int >= 0, got {step!r}")
            _check_weights_only(rank_state, "rank_state")
            json.dumps(meta_d := dict(meta or {}))
            if getattr(getattr(engine, "checkpoint_engine", None), "is_decoupled", bool)():
                raise CheckpointError("decoupled (async) DeepSpeed checkpoint engines unsupported")
            if self.rank == 0:
                self.cleanup_partial()
        except Exception as e:  # shared below, so no rank is left waiting in a collective
            err = err or f"cannot save checkpoint {step}: {e}"
        _raise_first(_gather(err))
        return tmp, meta_d

    def _retain_quietly(self, step: int) -> list[int]:
        """Retention that never fails training; the steps it removed."""
        try:
            return self._retain(step)
        except OSError as e:
            log.warning("checkpoint retention failed: %s", e)
            return []

    def _after_commit(self, info: CheckpointInfo) -> str | None:
        """Rank 0: retention, then the ``on_commit`` hook (e.g. the object-storage mirror).
        Returns the hook's error, which fails the save like a commit error would."""
        removed = self._retain_quietly(info.step)
        if self.on_commit is None:
            return None
        try:
            self.on_commit(info, removed)
        except Exception as e:
            return (
                f"checkpoint {info.step} is committed at {info.path} but could not be copied "
                f"to its storage ({type(e).__name__}: {e})"
            )
        return None

    # -- asynchronous saves ------------------------------------------------------------------
    def save_async(
        self, engine: Any, step: int, rank_state: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> PendingSave:
        """Collectively snapshot ``engine`` + ``rank_state`` to host memory and write + commit
        checkpoint ``step`` in a background thread; returns once the snapshot is taken.

        Waits for the previous save first (one in flight at most). The checkpoint becomes
        visible to :meth:`list` / :meth:`latest` only when rank 0's thread has committed it;
        call :meth:`wait` (collective) before loading, rolling back or exiting. Files are the
        same bytes the synchronous :meth:`save` writes (CPU tensors).
        """
        self.wait()
        started = time.perf_counter()
        tmp, meta_d = self._prepare(engine, step, rank_state, meta)
        real = engine.checkpoint_engine
        if not hasattr(real, "save") or type(real).__name__ != "TorchCheckpointEngine":
            raise CheckpointError(
                f"checkpoint.async needs DeepSpeed's default TorchCheckpointEngine, the engine "
                f"uses {type(real).__name__}: drop the DeepSpeed checkpoint.writer settings"
            )
        capture = _CaptureEngine(real, self._pool)
        engine.checkpoint_engine = capture
        try:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        except BaseException:
            self._pool.give_back()
            raise
        finally:
            engine.checkpoint_engine = real
        own_state = _host_copy(rank_state)
        if self._pool.pinned_lent:  # the device-to-host copies were issued asynchronously
            torch.cuda.synchronize()
        blocked = time.perf_counter() - started
        pending = PendingSave(step=step, tmp=tmp, thread=threading.Thread(), blocked_s=blocked)
        pending.started = time.time()
        pending.thread = threading.Thread(
            target=self._write_async,
            args=(pending, real, capture.captured, own_state, meta_d),
            name=f"ckpt-write-{step}",
            daemon=True,
        )
        pending.thread.start()
        self.pending = pending
        self.last_blocked_s = blocked
        return pending

    def _write_async(
        self,
        pending: PendingSave,
        real: Any,
        files: list[tuple[str, Any]],
        rank_state: dict[str, Any],
        meta: dict[str, Any],
    ) -> None:
        tmp, done = pending.tmp, pending.tmp / DONE_DIR
        try:
            for path, state in files:
                _write_file(real, state, path)
            _write_rank_state(rank_state, tmp / "regimen" / f"rank{self.rank:05d}.pt")
            err = None
        except Exception as e:
            err = f"rank {self.rank}: " + _write_error(tmp, pending.step, e)
        files.clear()  # free the host copy
        try:
            done.mkdir(parents=True, exist_ok=True)
            atomic_write_json(done / f"rank{self.rank:05d}.json", {"error": err})
        except OSError as e:
            err = err or f"rank {self.rank} cannot mark checkpoint {pending.step} written: {e}"
        if self.rank == 0 and err is None:
            err = self._commit_when_written(pending, meta)
        pending.error = err
        pending.finished = time.time()

    def _commit_when_written(self, pending: PendingSave, meta: dict[str, Any]) -> str | None:
        """Rank 0: wait for every rank's marker, then hash, write the manifest, rename."""
        done = pending.tmp / DONE_DIR
        deadline = time.monotonic() + ASYNC_TIMEOUT_S
        errors: list[str] = []
        for r in range(self.world_size):
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
        try:
            shutil.rmtree(done)
            manifest = self._commit(pending.tmp, pending.step, meta)
        except Exception as e:
            return (
                f"checkpoint {pending.step} was not committed ({type(e).__name__}: {e}); "
                f"the previous checkpoints are untouched, {pending.tmp} is left for cleanup"
            )
        pending.info = CheckpointInfo(pending.step, self._dir(pending.step), manifest)
        return self._after_commit(pending.info)

    def wait(self, *, collective: bool = True) -> CheckpointInfo | None:
        """Block until the in-flight async save (if any) is committed; its info, else None.

        Collective (every rank learns every rank's error, then CheckpointError on all ranks)
        unless ``collective=False`` (use on error paths, where a peer may be gone). A no-op
        when nothing is in flight, which is the same on every rank.
        """
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        pending.thread.join()
        self._pool.give_back()
        if collective:
            results = _gather((pending.error, pending.info.manifest if pending.info else None))
            _raise_first([e for e, _ in results])
            return CheckpointInfo(pending.step, self._dir(pending.step), results[0][1])
        if pending.error is not None:
            raise CheckpointError(pending.error)
        return pending.info

    def _commit(self, tmp: Path, step: int, meta: dict[str, Any]) -> dict[str, Any]:
        files: dict[str, dict[str, Any]] = {}
        dirs = [tmp]
        for p in sorted(tmp.rglob("*")):
            if p.is_dir():
                dirs.append(p)
            elif p.name != MANIFEST:
                digest, size = _sha256(p)  # also fsyncs the file
                files[p.relative_to(tmp).as_posix()] = {"sha256": digest, "bytes": size}
        for d in dirs:
            _fsync_dir(d)
        manifest: dict[str, Any] = {"format": FORMAT, "step": step, "world_size": self.world_size}
        manifest |= {"created": time.time(), "meta": meta, "files": files}
        atomic_write_json(tmp / MANIFEST, manifest)
        final = self._dir(step)
        old = self.root / f".tmp-old-{final.name}-{time.monotonic_ns()}"
        if final.exists():  # re-save of a step (e.g. after a rollback): move the old one aside
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)
        return manifest

    def _retain(self, just_saved: int) -> list[int]:
        if self.keep == 0:
            return []
        infos = self.list()
        removed = []
        for info in infos[: max(0, len(infos) - self.keep)]:
            if info.step == just_saved or (self.protect is not None and self.protect(info.step)):
                continue
            self._remove(info.path)
            removed.append(info.step)
        return removed

    def _remove(self, path: Path) -> None:
        doomed = self.root / f".tmp-del-{path.name}-{time.monotonic_ns()}"
        os.rename(path, doomed)  # atomic: never a half-deleted dir that still has a manifest
        _fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints (``step-N`` dirs with a readable, matching manifest), by step."""
        out: list[CheckpointInfo] = []
        for p in self.root.iterdir() if self.root.is_dir() else ():
            m = _STEP_RE.match(p.name)
            if not m or not p.is_dir():
                continue
            try:
                manifest = json.loads((p / MANIFEST).read_text())
            except (OSError, ValueError):
                continue
            step = int(m.group(1))
            ok = isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
            if ok and manifest.get("format") == FORMAT and manifest.get("step") == step:
                out.append(CheckpointInfo(step, p, manifest))
        return sorted(out, key=lambda i: i.step)

    def latest(self, at_or_before: int | None = None) -> CheckpointInfo | None:
        """The newest committed checkpoint, optionally with ``step <= at_or_before``; else None."""
        infos = [i for i in self.list() if at_or_before is None or i.step <= at_or_before]
        return infos[-1] if infos else None

    def verify(self, info: CheckpointInfo) -> None:
        """Recompute every file's size and SHA-256; CheckpointError naming the first bad file."""
        for rel, want in sorted(info.manifest["files"].items()):
            p = info.path / rel
            problem = None
            if not isinstance(want, dict) or not p.is_file():
                problem = "is missing or has a malformed manifest entry"
            else:
                digest, size = _sha256(p)
                if size != want["bytes"] or digest != want["sha256"]:
                    problem = f"has {size} bytes sha256 {digest[:16]}…, manifest says "
                    problem += f"{want['bytes']} bytes sha256 {want['sha256'][:16]}…"
            if problem:
                raise CheckpointError(self._corrupt(info, f"{p} {problem}"))

    def scan_pickles(self, info: CheckpointInfo) -> None:
        """Refuse DeepSpeed files that reference anything but tensors and a few known classes.

        DeepSpeed unpickles its own files with ``weights_only=False``, and the manifest
        only proves the files were not changed *after* it was written: someone who can
        write the directory can rewrite both. So every pickle is scanned first, without
        executing it, for the globals it would import; any outside torch's weights-only
        set and :data:`DEEPSPEED_SAFE_GLOBALS` makes the checkpoint unloadable."""
        for rel in sorted(info.manifest["files"]):
            if not rel.startswith(f"{DS_TAG}/"):
                continue
            path = info.path / rel
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception as e:
                raise CheckpointError(
                    self._corrupt(info, f"{path} is not a readable torch file ({e})")
                ) from None
            unknown = sorted(set(found) - DEEPSPEED_SAFE_GLOBALS)
            if unknown:
                raise CheckpointError(
                    self._corrupt(
                        info,
                        f"{path} would import {', '.join(unknown)} when loaded, which no "
                        "DeepSpeed checkpoint does (refusing to unpickle it)",
                    )
                )

    def _corrupt(self, info: CheckpointInfo, detail: str) -> str:
        prev = self.latest(at_or_before=info.step - 1)
        fix = (
            f"resume from the earlier checkpoint at step {prev.step} ({prev.path})"
            if prev
            else "no earlier checkpoint exists; restart the run from scratch"
        )
        return (
            f"checkpoint step {info.step} is corrupt or was tampered with: {detail}. "
            f"Do not load it; {fix}, and delete {info.path}."
        )

    def load_rank_state(self, info: CheckpointInfo, rank: int) -> dict[str, Any]:
        """``rank``'s saved rank_state: bytes checked against the manifest, then
        ``torch.load(weights_only=True, map_location="cpu")``. Not collective."""
        rel = f"regimen/rank{rank:05d}.pt"
        want = info.manifest["files"].get(rel)
        if want is None:
            raise CheckpointError(
                f"checkpoint step {info.step} has no state for rank {rank} ({info.path / rel}); "
                f"it was saved with world size {info.manifest.get('world_size')}"
            )
        try:
            data = (info.path / rel).read_bytes()
        except OSError as e:
            raise CheckpointError(self._corrupt(info, f"{info.path / rel}: {e}")) from e
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise CheckpointError(self._corrupt(info, f"{info.path / rel} fails its sha256 check"))
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")

    def load_engine(
        self, engine: Any, info: CheckpointInfo, *, load_optimizer_states: bool = True
    ) -> None:
        """Collective: verify (rank 0, result shared with all ranks), then DeepSpeed-load ``info``.

        Raises CheckpointError on every rank, before DeepSpeed reads anything, if the
        checkpoint fails verification or was saved with another world size. LR scheduler
        states are not loaded (Regimen's schedules are restored from rank_state).
        """
        err = self._check_world()
        saved_ws = info.manifest.get("world_size")
        if err is None and saved_ws != self.world_size:
            err = (
                f"checkpoint step {info.step} ({info.path}) was saved with world size {saved_ws} "
                f"but this run has {self.world_size}; resume with {saved_ws} workers "
                "(ZeRO optimizer shards and rank states cannot be re-partitioned)"
            )
        if err is None and self.rank == 0:
            try:
                self.verify(info)
                self.scan_pickles(info)
            except Exception as e:  # shared below, so no rank is left waiting in a collective
                err = (
                    str(e) if isinstance(e, CheckpointError) else f"cannot verify {info.path}: {e}"
                )
        _raise_first(_gather(err))
        load_path, _ = engine.load_checkpoint(
            str(info.path), tag=DS_TAG, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=False,
        )  # fmt: skip
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {info.path / DS_TAG}")

    def discard_after(self, step: int) -> _Paths:
        """Delete committed checkpoints with a step > ``step`` (rank 0 only); the removed dirs.

        Call it after a rollback to ``step``: checkpoints of the abandoned timeline would
        otherwise stay ``latest()`` and outrank new ones in retention.
        """
        doomed = [i.path for i in self.list() if i.step > step] if self.rank == 0 else []
        for p in doomed:
            self._remove(p)
        return doomed

    def cleanup_partial(self) -> _Paths:
        """Remove leftover ``.tmp-*`` dirs of interrupted saves/deletes (rank 0 only); the list."""
        if self.rank != 0 or not self.root.is_dir():
            return []
        removed = [p for p in self.root.iterdir() if p.name.startswith(".tmp-") and p.is_dir()]
        for p in removed:
            shutil.rmtree(p)
        return removed
