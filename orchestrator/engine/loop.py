"""The training loop every rank runs: build, resume, step with technique hooks, checkpoint.

Ray is not needed here: the loop takes a :class:`WorkerContext` and expects
``torch.distributed`` to be initialised (Ray Train does it; tests may do it by
hand). Rank 0 additionally streams metrics to MLflow through an async sink.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.continual.technique import attach as attach_continual
from orchestrator.continual.technique import summary_of as continual_summary
from orchestrator.engine.checkpoint import CheckpointInfo, CheckpointStore, atomic_write_json
from orchestrator.engine.data import BatchSource, build_data
from orchestrator.engine.ds_config import build_ds_config
from orchestrator.engine.optim import StepGate, build_optimizer
from orchestrator.engine.remote import CheckpointMirror, is_remote, run_storage_uri
from orchestrator.engine.tasks import build_task_model, eval_metrics, task_for
from orchestrator.errors import CheckpointError, RollbackExhausted
from orchestrator.recipe.schema import Recipe
from orchestrator.techniques.base import Setup, Technique, TrainState, Verdict
from orchestrator.techniques.registry import build_techniques

SUMMARY_FILE = "summary.json"
STOPPED_FILE = "stopped.json"  # a STOP verdict; `regimen resume` removes it


@dataclass
class WorkerContext:
    """Where this job lives and how it reports. Identical on every rank but for ``rank``."""

    run_dir: Path
    rank: int = 0
    world_size: int = 1
    tracking_uri: str | None = None
    run_id: str | None = None
    resume_step: int | None = None
    on_progress: Callable[[dict[str, Any]], None] | None = None
    stop_after_steps: int | None = None


@dataclass
class Built:
    """The DeepSpeed engine and what the loop needs next to it."""

    engine: Any
    gate: StepGate
    optimizer: Any


@dataclass
class LoopState:
    """What the loop itself carries between steps (and into checkpoints)."""

    cursor: int = 0
    skip_ranges: list[tuple[int, int]] = field(default_factory=list)
    rollbacks: int = 0
    skipped_steps: int = 0
    segment: int = 0


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def initialize_engine(
    model: torch.nn.Module, techniques: list[Technique], recipe: Recipe, ctx: WorkerContext
) -> Built:
    """Let techniques shape param groups and config, then ``deepspeed.initialize``."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    setup = Setup(
        recipe=recipe,
        model=model,
        param_groups=[{"params": params, "name": "all"}],
        ds_config=build_ds_config(recipe),
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    for technique in techniques:
        technique.configure(setup)
    optimizer = build_optimizer(setup.param_groups, recipe.optimizer)
    for wrap in setup.wrap_optimizer:
        optimizer = wrap(optimizer)
    gate = StepGate(optimizer)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=setup.ds_config, dist_init_required=False
    )
    return Built(engine=engine, gate=gate, optimizer=optimizer)


def release_engine(engine: Any) -> None:
    """Make a DeepSpeed engine collectable: ``destroy()`` (ZeRO grad hooks) and remove the
    forward hooks it put on the module, whose closures would otherwise keep the engine, its
    optimizer and all optimizer state alive as long as the module lives."""
    if hasattr(engine, "destroy"):
        engine.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, name, None)
        if handle is not None and hasattr(handle, "remove"):
            handle.remove()
            setattr(engine, name, None)


def _agree(values: list[float], op: str) -> list[float]:
    """All-reduce a few floats (``sum`` or ``max``) so every rank sees the same numbers."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def _implements(technique: Technique, hook: str) -> bool:
    """Whether ``technique`` overrides the no-op ``hook`` of :class:`Technique`."""
    return getattr(type(technique), hook, None) is not getattr(Technique, hook)


def _on_device(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    """The batch on the engine's device (a no-op on CPU)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """One job on one rank. ``run()`` trains to the end and returns the summary."""

    def __init__(self, recipe: Recipe, ctx: WorkerContext):
        self.recipe = recipe
        self.ctx = ctx
        self.mirror = (
            CheckpointMirror(run_storage_uri(recipe.checkpoint.storage, ctx.run_dir.name))
            if is_remote(recipe.checkpoint.storage)
            else None
        )
        self.store = CheckpointStore(
            ctx.run_dir / "checkpoints",
            keep=recipe.checkpoint.keep,
            rank=ctx.rank,
            world_size=ctx.world_size,
            protect=self._protected,
            on_commit=self._mirror_commit if self.mirror is not None else None,
        )
        self.techniques = build_techniques(recipe)
        self._deciders = {  # fixed for the job: which techniques can return a verdict
            hook: [t for t in self.techniques if _implements(t, hook)]
            for hook in ("on_before_optimizer_step", "on_step_end")
        }
        self.loop = LoopState()
        self.protected_steps: set[int] = set()
        self.sink: Any = None
        self.events: list[dict[str, Any]] = []
        self.eval_results: dict[str, float] = {}
        self._prev_start = 0.0
        self._rolled_back = False
        self.segment_run_id: str | None = ctx.run_id

    # -- setup -------------------------------------------------------------------------------
    def _protected(self, step: int) -> bool:
        """Keep explicit targets and every checkpoint a spike rollback could still return to."""
        if step in self.protected_steps:
            return True
        guards = [t for t in self.techniques if hasattr(t, "rollback_floor")]
        floors = [t.rollback_floor(self.state.step) for t in guards]
        if not floors:
            return False
        target = self.store.latest(min(floors))
        return target is not None and step >= target.step

    def _emit(self, kind: str, **payload: Any) -> None:
        event = {"kind": kind, "step": self.state.step, "time": time.time(), **payload}
        self.events.append(event)
        if self.sink is not None:
            self.sink.event(kind, self.state.step, **payload)

    def _build(self) -> None:
        recipe, ctx = self.recipe, self.ctx
        if (ctx.run_dir / STOPPED_FILE).exists():
            raise RollbackExhausted(json.loads((ctx.run_dir / STOPPED_FILE).read_text())["reason"])
        torch.set_num_threads(
            recipe.resources.threads_per_worker or max(1, int(recipe.resources.cpus_per_worker))
        )
        _seed_everything(recipe.seed)
        self.data = build_data(recipe.data)
        self.batches = BatchSource(
            self.data.train, recipe.seed, recipe.schedule.micro_batch_size, ctx.rank, ctx.world_size
        )
        self.task = task_for(recipe.model)
        self.model = build_task_model(recipe.model, recipe.seed)
        self.state = TrainState(
            recipe=recipe,
            total_steps=recipe.schedule.steps,
            rank=ctx.rank,
            world_size=ctx.world_size,
            lr=recipe.optimizer.lr,
            model=self.model,
            emit=self._emit,
            run_dir=str(ctx.run_dir),
        )
        attach_continual(self)  # `continual:` stages and replay take over the batches
        if ctx.resume_step != -1:
            self._pull_from_remote_storage()
        resume = self.store.latest(ctx.resume_step) if ctx.resume_step != -1 else None
        rank_state = self.store.load_rank_state(resume, ctx.rank) if resume else None
        if rank_state is not None:
            for technique in self.techniques:
                technique.load_state_dict(rank_state["techniques"].get(technique.name, {}))
        self.built = initialize_engine(self.model, self.techniques, recipe, ctx)
        self.state.engine = self.built.engine
        if resume is not None and rank_state is not None:
            self.store.load_engine(self.built.engine, resume)
            self._restore_loop(rank_state)
            self._emit("resume", from_step=resume.step, checkpoint=str(resume.path))
        self._apply_manual_segment()

    def _mirror_commit(self, info: CheckpointInfo, removed_steps: list[int]) -> None:
        """Rank 0, after each commit: copy the checkpoint to `checkpoint.storage`, and drop
        there what retention just dropped here."""
        if self.mirror is None:  # only installed with a mirror
            return
        self.mirror.push(info.step, info.path, info.manifest)
        self.mirror.remove(removed_steps)

    def _pull_from_remote_storage(self) -> None:
        """With `checkpoint.storage` a URI: fetch the newest mirrored checkpoint (at or before
        the step to resume from) that this node does not have, e.g. on a fresh cluster.

        Rank 0 downloads (the store's directory is shared by the job's ranks); the others
        wait for it, and a failed download fails every rank."""
        if self.mirror is None:
            return
        error = None
        if self.ctx.rank == 0:
            local = self.store.latest(self.ctx.resume_step)
            try:
                step = self.mirror.pull_latest(
                    self.store.root, local.step if local else None, self.ctx.resume_step
                )
            except Exception as exc:
                error = str(exc)
            else:
                if step is not None:
                    self._emit("checkpoint_pulled", step=step, source=self.mirror.uri)
        errors: list[str | None] = [error]
        if dist.is_initialized() and self.ctx.world_size > 1:
            errors = [None] * self.ctx.world_size
            dist.all_gather_object(errors, error)
        if any(errors):
            raise CheckpointError(next(e for e in errors if e))

    def _apply_manual_segment(self) -> None:
        """`regimen rollback --skip-batches/--lr-scale`: the driver's ``segment.json``.

        Applied once: when this rank starts from the checkpoint the rollback chose and the
        checkpoint predates that segment (a later checkpoint carries the ranges itself).
        """
        path = self.ctx.run_dir / "segment.json"
        if not path.exists():
            return
        seg = json.loads(path.read_text())
        if self.state.step != seg["from_step"] or self.loop.segment >= seg["segment"]:
            return
        extra = {(int(a), int(b)) for a, b in seg.get("skip_ranges") or []}
        self.loop.skip_ranges = sorted(set(self.loop.skip_ranges) | extra)
        if seg.get("lr_scale") is not None:
            self.state.lr_scale = float(seg["lr_scale"])
        self.loop.segment = int(seg["segment"])
        self._emit(
            "manual_rollback", to_step=seg["from_step"], skipped=sorted(extra),
            lr_scale=self.state.lr_scale,
        )  # fmt: skip

    def _restore_loop(self, rank_state: dict[str, Any], keep_skips: bool = False) -> None:
        skips = self.loop.skip_ranges
        self.state.step = int(rank_state["step"])
        self.state.lr_scale = float(rank_state["lr_scale"])
        self.loop.cursor = int(rank_state["cursor"])
        self.loop.skip_ranges = [tuple(r) for r in rank_state["skip_ranges"]]  # type: ignore[misc]
        if keep_skips:
            self.loop.skip_ranges = sorted(set(self.loop.skip_ranges) | set(skips))
        else:  # a resume: counters continue; a rollback keeps counting forward instead
            self.loop.rollbacks = int(rank_state.get("rollbacks", 0))
            self.loop.segment = int(rank_state.get("segment", 0))
        _set_rng_state(rank_state["rng"])

    def _rank_state(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "cursor": self.loop.cursor,
            "lr_scale": self.state.lr_scale,
            "skip_ranges": [list(r) for r in self.loop.skip_ranges],
            "rollbacks": self.loop.rollbacks,
            "segment": self.loop.segment,
            "rng": _rng_state(),
            "techniques": {t.name: t.state_dict() for t in self.techniques},
        }

    # -- steps -------------------------------------------------------------------------------
    def _apply_lr(self) -> None:
        lr = self.state.lr * self.state.lr_scale
        for group in self.built.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_multiplier", 1.0)

    def _skip_data_ranges(self) -> None:
        for start, end in self.loop.skip_ranges:
            if start <= self.loop.cursor < end:
                self._emit("skip_data", start=self.loop.cursor, end=end)
                self.loop.cursor = end

    def _decide(self, hook: str, *args: Any) -> Verdict:
        """Run a verdict hook of every technique that implements it; the all-ranks maximum.

        Techniques that keep the base class's hook can only say PROCEED, and the technique
        list is the same on every rank: with none implementing the hook, every rank knows
        the answer without the all-reduce (two collectives a step saved in plain runs)."""
        deciders = self._deciders[hook]
        if not deciders:
            return Verdict.PROCEED
        return self._max_verdict([getattr(t, hook)(*args) for t in deciders])

    def _max_verdict(self, verdicts: list[Verdict]) -> Verdict:
        local = max(verdicts, default=Verdict.PROCEED)
        return Verdict(int(_agree([float(local)], "max")[0]))

    def _train_step(self) -> dict[str, float]:
        state, schedule = self.state, self.recipe.schedule
        started = time.perf_counter()
        state.metrics, state.regime_change = {}, False
        for technique in self.techniques:
            technique.on_step_begin(state)
        if state.request_rebuild:
            self._rebuild_engine()
        engine = self.built.engine  # after a rebuild: the new one (the old one is freed)
        self._apply_lr()
        self._skip_data_ranges()
        state.cursor = self.loop.cursor
        engine.train()
        loss_sum = 0.0
        for micro in range(schedule.grad_accumulation):
            batch = _on_device(self.batches.micro_batch_at(self.loop.cursor, micro), engine.device)
            loss = self.task.loss(engine, batch)
            engine.backward(loss)
            loss_sum += float(loss.detach())
            if micro < schedule.grad_accumulation - 1:
                engine.step()
        state.loss = _agree([loss_sum / schedule.grad_accumulation], "sum")[0] / self.ctx.world_size
        verdict = self._decide("on_before_optimizer_step", state)
        self.built.gate.skip_next = verdict >= Verdict.SKIP_STEP
        engine.step()
        skipped = self.built.gate.skip_next or verdict >= Verdict.SKIP_STEP
        self.built.gate.skip_next = False
        self.loop.skipped_steps += int(skipped)
        norm = engine.get_global_grad_norm()
        state.grad_norm = float(norm) if norm is not None else float("nan")
        state.step += 1
        self.loop.cursor += self.recipe.global_batch_size
        # A whole loop iteration (hooks, logging, progress) counts, not just the math:
        # measured start-to-start, so the previous iteration's tail is included.
        elapsed = started - self._prev_start if self._prev_start else time.perf_counter() - started
        self._prev_start = started
        metrics = {
            "loss": state.loss,
            "lr": state.lr * state.lr_scale,
            "grad_norm": state.grad_norm,
            "step_time_s": elapsed,
            "samples_per_s": self.recipe.global_batch_size / elapsed,
            "skipped": float(skipped),
            **state.metrics,
        }
        end_verdict = self._decide("on_step_end", state, metrics)
        if end_verdict == Verdict.ROLLBACK:
            if self.sink is not None:  # the spike's own metrics stay at their step, in this segment
                self.sink.log(state.step, metrics)
            self._rollback()
            self._rolled_back = True
        elif end_verdict == Verdict.STOP:
            reason = state.stop_reason or f"a technique stopped training at step {state.step}"
            if self.ctx.rank == 0:  # a Ray Train restart must not retry a deliberate stop
                stop = {"step": state.step, "reason": reason}
                atomic_write_json(self.ctx.run_dir / STOPPED_FILE, stop)
            raise RollbackExhausted(reason)
        return metrics

    def _rebuild_engine(self) -> None:
        """Release the engine (freeing its optimizer state), then build a new one on the module."""
        started = time.perf_counter()
        module = self.built.engine.module
        release_engine(self.built.engine)
        self.built = self.state.engine = None  # type: ignore[assignment]
        gc.collect()
        self.built = initialize_engine(module, self.techniques, self.recipe, self.ctx)
        self.state.engine = self.built.engine
        self.state.request_rebuild = False
        self.state.metrics["engine_rebuild_s"] = time.perf_counter() - started

    def _rollback(self) -> None:
        """Restore the newest checkpoint at or before ``state.rollback_to`` in place.

        Technique states come back from the checkpoint except for techniques with
        ``restore_on_rollback = False`` (the spike guard's counters). Skip ranges of
        earlier rollbacks are kept and ``state.skip_request`` is added; the checkpoints
        of the abandoned timeline are discarded; a new lineage segment starts.
        """
        state = self.state
        self.store.wait()  # an async save in flight may be the target: let it commit first
        target: CheckpointInfo | None = self.store.latest(state.rollback_to)
        if target is None:
            raise RollbackExhausted(
                f"step {state.step}: a rollback was requested but no checkpoint exists at or "
                f"before step {state.rollback_to}: checkpoint more often (checkpoint.every)"
            )
        started = time.perf_counter()
        from_step = state.step
        rank_state = self.store.load_rank_state(target, self.ctx.rank)
        for technique in self.techniques:
            if getattr(technique, "restore_on_rollback", True):
                technique.load_state_dict(rank_state["techniques"].get(technique.name, {}))
        if state.request_rebuild:
            self._rebuild_engine()
        self.store.load_engine(self.built.engine, target)
        if state.reset_moments:  # fresh moments: torch optimizers re-create their state lazily
            opt = getattr(self.built.optimizer, "optimizer", self.built.optimizer)
            getattr(opt, "state", {}).clear()
        self._restore_loop(rank_state, keep_skips=True)
        requested = [(int(a), int(b)) for a, b in state.skip_request if b > a]
        self.loop.skip_ranges = sorted(set(self.loop.skip_ranges) | set(requested))
        self.store.discard_after(target.step)
        self.loop.rollbacks += 1
        reason = dict(state.rollback_reason)
        state.rollback_to, state.skip_request, state.reset_moments = None, [], False
        state.rollback_reason = {}
        for technique in self.techniques:
            technique.on_rollback(state, target.step)
        self.last_recovery_s = time.perf_counter() - started
        payload = {
            "from_step": from_step,
            "to_step": target.step,
            "skipped": [list(r) for r in requested],
            "skip_ranges": [list(r) for r in self.loop.skip_ranges],
            "lr_scale": state.lr_scale,
            "reason": reason,
            "restore_s": self.last_recovery_s,
        }
        self._emit("rollback", **payload)
        self._new_segment("rollback", target.step, payload)

    def _new_segment(self, kind: str, restored_step: int, payload: dict[str, Any]) -> None:
        """Rank 0: a child MLflow run for what follows; the sink switches to it."""
        self.loop.segment += 1
        if self.sink is None or not self.ctx.tracking_uri or not self.ctx.run_id:
            return
        from orchestrator.tracking.segments import open_segment_run
        from orchestrator.tracking.sink import MetricSink

        self.sink.close(timeout_s=10.0)
        self.segment_run_id = open_segment_run(
            self.ctx.tracking_uri,
            self.ctx.run_id,
            segment=self.loop.segment,
            kind=kind,
            restored_step=restored_step,
            payload=payload,
            rollbacks=self.loop.rollbacks,
        )
        self.sink = MetricSink(
            self.ctx.tracking_uri, self.segment_run_id, spool_dir=self.ctx.run_dir / "spool"
        )

    # -- eval, checkpoints, reporting --------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over a fixed slice of the eval split, averaged across ranks.

        All of the task's eval metrics (``eval_accuracy`` too for classification) are
        left in ``self.eval_results``."""
        evalset = self.data.eval
        if evalset is None or len(evalset) == 0:
            return None
        engine, mb = self.built.engine, self.recipe.schedule.micro_batch_size
        engine.eval()
        sums = [0.0, 0.0, 0.0, 0.0]  # loss sum, batches, correct, samples
        for b in range(self.recipe.schedule.eval_batches):
            start = (b * self.ctx.world_size + self.ctx.rank) * mb
            idx = [(start + j) % len(evalset) for j in range(mb)]
            batch = {k: torch.stack([evalset[i][k] for i in idx]) for k in evalset[0]}
            got = self.task.eval_batch(engine, _on_device(batch, engine.device))
            sums = [sums[0] + got.loss, sums[1] + 1.0, sums[2] + got.correct, sums[3] + got.count]
        engine.train()
        self.eval_results = eval_metrics(_agree(sums, "sum"), self.task)
        return self.eval_results["eval_loss"]

    def checkpoint(self, final: bool = False) -> CheckpointInfo | None:
        """Write a checkpoint of the current step (collective). With ``checkpoint.async`` (and
        not ``final``) only the host snapshot blocks; None is returned, the write commits in
        the background (``self.store.wait()`` before anything reads checkpoints)."""
        if self.sink is not None:
            self.sink.flush(timeout_s=5.0)
        args = (self.built.engine, self.state.step, self._rank_state())
        meta = {"cursor": self.loop.cursor}
        if self.recipe.checkpoint.is_async and not final:
            pending = self.store.save_async(*args, meta=meta)
            path = str(self.store.path_of(pending.step))
            self._emit("checkpoint", path=path, blocked_s=pending.blocked_s, mode="async")
            return None
        info = self.store.save(*args, meta=meta)
        self._emit("checkpoint", path=str(info.path), blocked_s=self.store.last_blocked_s)
        return info

    def _open_sink(self) -> None:
        if self.ctx.rank != 0 or not self.ctx.tracking_uri or not self.ctx.run_id:
            return
        from orchestrator.tracking.sink import MetricSink

        self.sink = MetricSink(
            self.ctx.tracking_uri, self.ctx.run_id, spool_dir=self.ctx.run_dir / "spool"
        )
        from orchestrator.tracking.record import log_worker_record  # best effort, never raises

        log_worker_record(
            self.ctx.tracking_uri, self.ctx.run_id, recipe=self.recipe.model_dump(mode="json"),
            fingerprint=self.data.fingerprint, description=self.data.description,
            ds_config=getattr(self.built.engine, "config", None), world_size=self.ctx.world_size,
            device=getattr(self.built.engine, "device", "cpu"),
        )  # fmt: skip
        for e in self.events:  # emitted while building (resume, manual_rollback): record them
            extra = {k: v for k, v in e.items() if k not in ("kind", "step", "time")}
            self.sink.event(e["kind"], e["step"], **extra)
        if any(e["kind"] == "resume" for e in self.events):  # a restart: close dead segments
            from orchestrator.tracking.segments import close_segments

            with contextlib.suppress(Exception):
                close_segments(
                    self.ctx.tracking_uri, self.ctx.run_id, "KILLED", "worker died; job restarted"
                )

    def _end_segment(self, status: str) -> None:
        """Rank 0: end the current rollback segment run (the controller ends the job run)."""
        if self.sink is None or self.segment_run_id in (None, self.ctx.run_id):
            return
        from orchestrator.tracking.segments import end_segment

        try:
            uri, run_id = self.ctx.tracking_uri or "", self.segment_run_id or ""
            end_segment(uri, run_id, status)  # type: ignore[arg-type]
        except Exception:
            pass

    def run(self) -> dict[str, Any]:
        """Train from the latest checkpoint (if any) to ``schedule.steps``; return the summary."""
        self._build()
        self._open_sink()
        state, recipe, ctx = self.state, self.recipe, self.ctx
        for technique in self.techniques:
            technique.on_train_start(state)
        last_metrics: dict[str, float] = {}
        every = recipe.checkpoint.every
        steps_this_run = 0
        status = "FAILED"
        try:
            while state.step < recipe.schedule.steps:
                last_metrics = self._train_step()
                steps_this_run += 1
                if self._rolled_back:  # already logged at the spike's step; nothing to checkpoint
                    self._rolled_back = False
                    continue
                if recipe.schedule.eval_every and state.step % recipe.schedule.eval_every == 0:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        last_metrics.update(self.eval_results)
                if self.sink is not None and state.step % recipe.schedule.log_every == 0:
                    self.sink.log(state.step, last_metrics)
                if ctx.on_progress is not None and ctx.rank == 0:
                    ctx.on_progress(
                        {"step": state.step, "total": recipe.schedule.steps, "loss": state.loss}
                    )
                if every and state.step % every == 0 and state.step < recipe.schedule.steps:
                    self.checkpoint()
                if ctx.stop_after_steps is not None and steps_this_run >= ctx.stop_after_steps:
                    status = "KILLED"
                    return self._summary(last_metrics, None, finished=False)
            eval_loss = self.evaluate()
            final = self.checkpoint(final=True) if recipe.checkpoint.at_end else None
            for technique in self.techniques:
                technique.on_train_end(state)
            if eval_loss is not None:
                last_metrics.update(self.eval_results)
                if self.sink is not None:
                    self.sink.log(state.step, dict(self.eval_results))
            status = "FINISHED"
            return self._summary(last_metrics, final, finished=True)
        finally:
            try:
                self.store.wait(collective=False)  # never exit with an async save in flight
            except Exception:
                if status != "FAILED":
                    raise
            if self.sink is not None:
                self.sink.close()
                self._end_segment(status)

    def _summary(
        self, metrics: dict[str, float], final: CheckpointInfo | None, finished: bool
    ) -> dict[str, Any]:
        summary = {
            "steps": self.state.step,
            "final_loss": metrics.get("loss"),
            "eval_loss": metrics.get("eval_loss"),
            "eval_accuracy": metrics.get("eval_accuracy"),
            "rollbacks": self.loop.rollbacks,
            "skipped_steps": self.loop.skipped_steps,
            "checkpoint": str(final.path) if final else None,
            "finished": finished,
            "data_fingerprint": self.data.fingerprint,
            "events": self.events,
            **continual_summary(self),
        }
        if self.ctx.rank == 0:
            atomic_write_json(self.ctx.run_dir / SUMMARY_FILE, summary)
        return summary


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary rank 0 wrote at the end of a job, or None."""
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def train(recipe: Recipe, ctx: WorkerContext) -> dict[str, Any]:
    """Run one job on this rank (the function every Ray Train worker calls)."""
    os.makedirs(ctx.run_dir, exist_ok=True)
    return Trainer(recipe, ctx).run()
