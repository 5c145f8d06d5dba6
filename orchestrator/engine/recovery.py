"""Recovery: what a rank saves besides the engine, how it comes back, and in-place rollback.

* the loop's own state (:class:`LoopState`) and the rank state of every checkpoint
  (step, cursor, LR scale, skip ranges, counters, RNG, technique states);
* resume: restore that state; a manual rollback's ``segment.json`` (skip ranges, LR scale);
  the newest mirrored checkpoint pulled from remote storage;
* a ROLLBACK :class:`~orchestrator.techniques.base.Decision`: restore a checkpoint in place,
  skip the decided stream ranges, start a new lineage segment;
* a STOP decision's record (``stopped.json``), which a Ray Train restart must not retry.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from orchestrator.distributed import all_gather_objects
from orchestrator.engine.checkpoint import CheckpointInfo, CheckpointStore
from orchestrator.errors import BadWorker, CheckpointError, RollbackExhausted
from orchestrator.rundir import RunDir, Stopped
from orchestrator.techniques.base import Capability, Decision, Technique, TrainState, has

if TYPE_CHECKING:
    from orchestrator.engine.remote import CheckpointMirror
    from orchestrator.engine.trainer import Trainer


@dataclass
class LoopState:
    """What the loop itself carries between steps (and into checkpoints)."""

    cursor: int = 0
    skip_ranges: list[tuple[int, int]] = field(default_factory=list)
    rollbacks: int = 0
    skipped_steps: int = 0
    segment: int = 0


def rng_state() -> dict[str, Any]:
    """torch, Python and NumPy RNG states in checkpoint-safe types, and under ``cuda`` the
    state of every CUDA device this process sees (GPU dropout draws from those).

    ``cuda`` is left out when CUDA was never initialised here: nothing drew from it yet, so
    the seeded state a resume starts from is the one this run has too.
    """
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())  # CPU uint8 tensors
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned.

    A checkpoint from a CPU run (no ``cuda``) leaves the CUDA generators as seeded; one from
    a GPU run loads on a CPU-only process without its CUDA part. Devices are matched by
    index, as many as both sides have (each Ray worker sees its own GPU as device 0).
    """
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for index, device_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_state(state: TrainState, loop: LoopState, techniques: Sequence[Technique]) -> dict:
    """This rank's part of a checkpoint besides the engine."""
    return {
        "step": state.step,
        "cursor": loop.cursor,
        "lr_scale": state.lr_scale,
        "skip_ranges": [list(r) for r in loop.skip_ranges],
        "rollbacks": loop.rollbacks,
        "segment": loop.segment,
        "rng": rng_state(),
        "techniques": {t.name: t.state_dict() for t in techniques},
    }


def restore_loop(
    state: TrainState, loop: LoopState, saved: dict[str, Any], keep_skips: bool = False
) -> None:
    """Step, cursor, LR scale, skip ranges and RNG from ``saved``. A resume also takes the
    counters; a rollback (``keep_skips``) keeps counting forward and keeps its skip ranges."""
    skips = loop.skip_ranges
    state._update(step=int(saved["step"]), lr_scale=float(saved["lr_scale"]))
    loop.cursor = int(saved["cursor"])
    loop.skip_ranges = [(int(a), int(b)) for a, b in saved["skip_ranges"]]
    if keep_skips:
        loop.skip_ranges = sorted(set(loop.skip_ranges) | set(skips))
    else:
        loop.rollbacks = int(saved.get("rollbacks", 0))
        loop.segment = int(saved.get("segment", 0))
    set_rng_state(saved["rng"])


def load_techniques(
    techniques: Sequence[Technique], saved: dict[str, Any], rollback: bool = False
) -> None:
    """Technique states from a rank state; on a rollback not those that KEEP_STATE."""
    for technique in techniques:
        if rollback and has(technique, Capability.KEEPS_STATE_ON_ROLLBACK):
            continue
        technique.load_state_dict(saved["techniques"].get(technique.name, {}))


def protected(
    step: int,
    explicit: set[int],
    techniques: Sequence[Technique],
    now: int,
    store: CheckpointStore,
) -> bool:
    """Retention: keep explicit targets and every checkpoint a rollback could still return to
    (from the newest at or before the earliest GUARDS_ROLLBACK floor on)."""
    if step in explicit:
        return True
    floors = [
        f
        for t in techniques
        if has(t, Capability.GUARDS_ROLLBACK)
        for f in [t.rollback_floor(now)]
        if f is not None
    ]
    if not floors:
        return False
    target = store.latest(min(floors))
    return target is not None and step >= target.step


def check_not_stopped(run_dir: RunDir) -> None:
    """A job that a STOP decision ended does not start again (until `regimen resume`, or
    the driver restarting it without a bad worker's node, clears the record)."""
    stopped = run_dir.read_stopped()
    if stopped is not None:
        raise stop_error(stopped)


def record_stop(run_dir: RunDir, rank: int, stopped: Stopped) -> None:
    """Rank 0: write ``stopped.json`` (a Ray Train restart must not retry a deliberate stop)."""
    if rank == 0:
        run_dir.write_stopped(stopped)


def stop_error(stopped: Stopped) -> RollbackExhausted:
    """The error a STOP ends the job with: :class:`BadWorker` (naming the rank, for the
    driver) when a rank's hardware is the cause, else :class:`RollbackExhausted`."""
    if stopped.bad_rank is not None:
        return BadWorker(stopped.reason, stopped.bad_rank, stopped.step)
    return RollbackExhausted(stopped.reason)


def apply_manual_segment(
    run_dir: RunDir, state: TrainState, loop: LoopState, emit: Callable[..., None]
) -> None:
    """`regimen rollback --skip-batches/--lr-scale`: the driver's ``segment.json``.

    Applied once: when this rank starts from the checkpoint the rollback chose and the
    checkpoint predates that segment (a later checkpoint carries the ranges itself).
    """
    seg = run_dir.read_segment()
    if seg is None or state.step != seg.from_step or loop.segment >= seg.segment:
        return
    extra = set(seg.skip_ranges)
    loop.skip_ranges = sorted(set(loop.skip_ranges) | extra)
    if seg.lr_scale is not None:
        state.set_lr_scale(seg.lr_scale)
    loop.segment = seg.segment
    emit("manual_rollback", to_step=seg.from_step, skipped=sorted(extra), lr_scale=state.lr_scale)


def pull_from_remote(
    mirror: CheckpointMirror | None,
    store: CheckpointStore,
    rank: int,
    resume_step: int | None,
    emit: Callable[..., None],
) -> None:
    """With `checkpoint.storage` a URI: fetch the newest mirrored checkpoint (at or before
    the step to resume from) that this node does not have, e.g. on a fresh cluster.

    Rank 0 downloads (the store's directory is shared by the job's ranks); the others
    wait for it, and a failed download fails every rank."""
    if mirror is None:
        return
    error = None
    if rank == 0:
        local = store.latest(resume_step)
        try:
            step = mirror.pull_latest(store.root, local.step if local else None, resume_step)
        except Exception as exc:
            error = str(exc)
        else:
            if step is not None:
                emit("checkpoint_pulled", step=step, source=mirror.uri)
    errors: list[str | None] = all_gather_objects(error)
    if any(errors):
        raise CheckpointError(next(e for e in errors if e))


def rollback(trainer: Trainer, decision: Decision) -> None:
    """Restore the newest checkpoint at or before ``decision.to_step`` in place.

    Technique states come back from the checkpoint except for KEEPS_STATE_ON_ROLLBACK
    techniques (the spike guard's counters). Skip ranges of earlier rollbacks are kept and
    ``decision.skip`` is added; the checkpoints of the abandoned timeline are discarded; a
    new lineage segment starts.
    """
    state, loop, store = trainer.state, trainer.loop, trainer.store
    store.wait()  # an async save in flight may be the target: let it commit first
    target: CheckpointInfo | None = store.latest(decision.to_step)
    if target is None:
        raise RollbackExhausted(
            f"step {state.step}: a rollback was requested but no checkpoint exists at or "
            f"before step {decision.to_step}: checkpoint more often (checkpoint.every)"
        )
    started = time.perf_counter()
    from_step = state.step
    saved = store.load_rank_state(target, trainer.ctx.rank)
    load_techniques(trainer.techniques, saved, rollback=True)
    if state._take_rebuild():
        trainer.rebuild_engine()
    store.load_engine(trainer.built.engine, target)
    if decision.reset_moments:  # fresh moments: torch optimizers re-create their state lazily
        opt = getattr(trainer.built.optimizer, "optimizer", trainer.built.optimizer)
        getattr(opt, "state", {}).clear()
    restore_loop(state, loop, saved, keep_skips=True)
    requested = list(decision.skip)
    loop.skip_ranges = sorted(set(loop.skip_ranges) | set(requested))
    store.discard_after(target.step)
    loop.rollbacks += 1
    reason = dict(decision.reason)
    for technique in trainer.techniques:
        technique.on_rollback(state, target.step)
    for technique in trainer.techniques:
        technique.on_checkpoint_loaded(state, target.step)
    trainer.last_recovery_s = time.perf_counter() - started
    payload = {
        "from_step": from_step,
        "to_step": target.step,
        "skipped": [list(r) for r in requested],
        "skip_ranges": [list(r) for r in loop.skip_ranges],
        "lr_scale": state.lr_scale,
        "reason": reason,
        "restore_s": trainer.last_recovery_s,
    }
    trainer.emit("rollback", **payload)
    loop.segment += 1
    trainer.reporter.new_segment("rollback", target.step, payload, loop.segment, loop.rollbacks)
