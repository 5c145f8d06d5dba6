"""The checkpoint store: collective save (sync or async), list/latest, verified load, retention.

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

:meth:`CheckpointStore.load_engine` checks the directory against the manifest (every file
listed with a matching size and SHA-256, every entry present, no symbolic links, nothing
else; see :func:`.io.tree_problem`) and scans every torch file under ``ds/`` for the globals
its pickle would import (:mod:`.safety`) before DeepSpeed opens any of them, then lets
DeepSpeed read its files only through the weights-only unpickler
(:func:`.safety.weights_only_loads`). :meth:`CheckpointStore.load_rank_state` makes
the same directory check (without hashing) before it reads a rank state. :meth:`list` and
:meth:`latest` return every directory with a committed manifest; a tampered one among them is
refused, naming the file, when it is loaded, never loaded in part. The store assumes a
filesystem shared by all ranks (rank 0 hashes every rank's files) and DeepSpeed's default
``TorchCheckpointEngine``.

Asynchronous saves (:meth:`CheckpointStore.save_async`, recipe ``checkpoint.async: true``,
mechanics in :mod:`.async_save`): at most one save is in flight; the next save, a rollback, a
resume and the end of training call :meth:`CheckpointStore.wait` first. Until the rename the
checkpoint is a ``.tmp-*`` directory that :meth:`CheckpointStore.list` never returns, so a
crash mid-write leaves nothing loadable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.distributed import all_gather_objects, world
from orchestrator.engine.checkpoint import async_save
from orchestrator.engine.checkpoint.async_save import HostPool, PendingSave
from orchestrator.engine.checkpoint.io import (
    CheckpointInfo,
    file_problem,
    fsync_dir,
    read_manifest,
    tree_problem,
    write_error,
    write_manifest,
    write_rank_state,
)
from orchestrator.engine.checkpoint.safety import (
    check_weights_only,
    load_weights_only,
    pickle_problem,
    weights_only_loads,
)
from orchestrator.errors import CheckpointError

log = logging.getLogger(__name__)

DS_TAG = "ds"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_Paths = list[Path]


def _gather(obj: Any) -> list[Any]:
    """All-gather a small picklable object; also a barrier. Identity without torch.distributed."""
    return all_gather_objects(obj)


def _raise_first(errors: list[str | None]) -> None:
    for i, e in enumerate(errors):
        if e is not None:
            raise CheckpointError(e if len(errors) == 1 else f"rank {i}: {e}")


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
            write_rank_state(rank_state, own)
            err = None
        except Exception as e:  # shared below, so no rank is left waiting in a collective
            err = write_error(tmp, step, e)
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
            check_weights_only(rank_state, "rank_state")
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
        real, captured, own_state = async_save.snapshot(engine, tmp, DS_TAG, rank_state, self._pool)
        blocked = time.perf_counter() - started
        pending = PendingSave(step=step, tmp=tmp, thread=threading.Thread(), blocked_s=blocked)
        pending.started = time.time()
        pending.thread = threading.Thread(
            target=self._write_async,
            args=(pending, real, captured, own_state, meta_d),
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
        err = async_save.write_rank_files(pending, real, files, rank_state, self.rank)
        if self.rank == 0 and err is None:
            err = self._commit_when_written(pending, meta)
        pending.error = err
        pending.finished = time.time()

    def _commit_when_written(self, pending: PendingSave, meta: dict[str, Any]) -> str | None:
        """Rank 0: wait for every rank's marker, then hash, write the manifest, rename."""
        err = async_save.wait_for_ranks(pending, self.world_size)
        if err is not None:
            return err
        try:
            shutil.rmtree(pending.tmp / async_save.DONE_DIR)
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
        manifest = write_manifest(tmp, step, self.world_size, meta)
        final = self._dir(step)
        old = self.root / f".tmp-old-{final.name}-{time.monotonic_ns()}"
        if final.exists():  # re-save of a step (e.g. after a rollback): move the old one aside
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(self.root)
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
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints (``step-N`` dirs with a readable, matching manifest), by step."""
        out: list[CheckpointInfo] = []
        for p in self.root.iterdir() if self.root.is_dir() else ():
            m = _STEP_RE.match(p.name)
            if not m or not p.is_dir():
                continue
            step = int(m.group(1))
            manifest = read_manifest(p, step)
            if manifest is not None:
                out.append(CheckpointInfo(step, p, manifest))
        return sorted(out, key=lambda i: i.step)

    def latest(self, at_or_before: int | None = None) -> CheckpointInfo | None:
        """The newest committed checkpoint, optionally with ``step <= at_or_before``; else None."""
        infos = [i for i in self.list() if at_or_before is None or i.step <= at_or_before]
        return infos[-1] if infos else None

    def check_tree(self, info: CheckpointInfo) -> None:
        """CheckpointError unless ``info``'s directory holds exactly the manifest's files as
        regular files (no unlisted, missing or renamed file, no symbolic link); no hashing."""
        try:
            problem = tree_problem(info.path, info.manifest["files"])
        except OSError as e:
            problem = f"{info.path} cannot be listed ({e})"
        if problem is not None:
            raise CheckpointError(self._corrupt(info, problem))

    def verify(self, info: CheckpointInfo) -> None:
        """:meth:`check_tree`, then recompute every file's size and SHA-256; CheckpointError
        naming the first bad file."""
        self.check_tree(info)
        for rel, want in sorted(info.manifest["files"].items()):
            p = info.path / rel
            problem = file_problem(p, want)
            if problem:
                raise CheckpointError(self._corrupt(info, f"{p} {problem}"))

    def scan_pickles(self, info: CheckpointInfo) -> None:
        """Refuse pickles that reference anything but tensors and a few known classes.

        The manifest only proves the files were not changed *after* it was written: someone
        who can write the directory can rewrite both. So every torch file below the
        directory's ``ds/`` (whether the manifest lists it or not) is scanned first, without
        executing it, for the globals it would import; any outside torch's weights-only set
        and ``DEEPSPEED_SAFE_GLOBALS`` makes the checkpoint unloadable (see :mod:`.safety`).
        DeepSpeed's loads are weights-only as well (:func:`.safety.weights_only_loads`); the
        scan words the refusal before anything is opened."""
        for path in sorted((info.path / DS_TAG).rglob("*")):
            if path.is_symlink() or not path.is_file() or path.suffix != ".pt":
                continue
            problem = pickle_problem(path)
            if problem is not None:
                raise CheckpointError(self._corrupt(info, problem))

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
        self.check_tree(info)
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
        return load_weights_only(data)

    def load_engine(
        self, engine: Any, info: CheckpointInfo, *, load_optimizer_states: bool = True
    ) -> None:
        """Collective: verify (rank 0, result shared with all ranks), then DeepSpeed-load ``info``.

        Raises CheckpointError on every rank, before DeepSpeed reads anything, if the
        checkpoint fails verification (:meth:`verify`, :meth:`scan_pickles`) or was saved with
        another world size. DeepSpeed then reads its files with the weights-only unpickler
        only; a file that needs more raises CheckpointError. LR scheduler states are not
        loaded (Regimen's schedules are restored from rank_state).
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
        try:
            with weights_only_loads(engine.checkpoint_engine):
                load_path, _ = engine.load_checkpoint(
                    str(info.path), tag=DS_TAG, load_optimizer_states=load_optimizer_states,
                    load_lr_scheduler_states=False,
                )  # fmt: skip
        except pickle.UnpicklingError as e:
            detail = f"a file under {info.path / DS_TAG} needs more than weights-only loading ({e})"
            raise CheckpointError(self._corrupt(info, detail)) from None
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
