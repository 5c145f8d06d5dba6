"""The training loop every rank runs: build, resume, step with technique hooks, checkpoint.

Ray is not needed here: the loop takes a :class:`WorkerContext` and expects
``torch.distributed`` to be initialised (Ray Train does it; tests may do it by
hand). Rank 0 additionally streams metrics to MLflow (:mod:`.reporting`); restoring,
rolling back and stopping live in :mod:`.recovery`.

One step (:meth:`Trainer.run_step`)::

    on_step_begin -> [engine rebuild] -> LR, data skip -> micro-batches (forward/backward)
    -> loss all-reduced -> on_before_optimizer_step -> Decision agreed -> engine step or skip
    -> on_step_end -> recorded metrics reduced -> Decision agreed -> rollback / stop
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from orchestrator.data import BatchSource, build_data
from orchestrator.distributed import all_reduce_floats
from orchestrator.engine import recovery
from orchestrator.engine.build import initialize_engine, release_engine
from orchestrator.engine.checkpoint import CheckpointInfo, CheckpointStore
from orchestrator.engine.export import (
    EXPORT_RECORD,
    export_model,
    exportable,
    exported_files,
)
from orchestrator.engine.recovery import LoopState
from orchestrator.engine.remote import CheckpointMirror, is_remote, push_export, run_storage_uri
from orchestrator.engine.replay import replay_step
from orchestrator.engine.reporting import Reporter
from orchestrator.engine.steptime import StepClock
from orchestrator.engine.tasks import build_task_model, eval_metrics, task_for
from orchestrator.engine.throughput import Throughput
from orchestrator.errors import TrackingError
from orchestrator.recipe.hf_models import attention_implementation
from orchestrator.recipe.schema import Recipe
from orchestrator.rundir import RunDir, Stopped
from orchestrator.techniques.base import (
    Action,
    BatchStream,
    Capability,
    Context,
    Decision,
    Reduce,
    Technique,
    TrainState,
    combine,
    has,
)
from orchestrator.techniques.registry import build_techniques
from orchestrator.timeline import Timeline

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """Where this job lives and how it reports. Identical on every rank but for ``rank`` and
    ``node_id``."""

    run_dir: Path
    rank: int = 0
    world_size: int = 1
    tracking_uri: str | None = None
    run_id: str | None = None
    resume_step: int | None = None
    on_progress: Callable[[dict[str, Any]], None] | None = None
    stop_after_steps: int | None = None
    # this rank's name in MLflow's system metrics (system/<node_id>/...); the launcher
    # names the rank and its machine, e.g. rank0-1a2b3c4d; None: rank<R>
    node_id: str | None = None
    marks: dict[str, float] = field(default_factory=dict)  # start-up marks taken before


class StepHook:
    """Observes a :class:`Trainer`'s steps (tests, benchmarks); every method is a no-op.

    ``before_step`` runs before ``on_step_begin``; ``before_optimizer_step`` after the
    backward of the last micro-batch, before the techniques' verdict; ``after_decision``
    once the step's final decision is agreed, before the loop acts on it; ``after_step``
    once the step is complete (after a rollback it decided, too) with the step's metrics."""

    def before_step(self, trainer: Trainer) -> None:
        """Before the step's first hook."""

    def before_optimizer_step(self, trainer: Trainer) -> None:
        """Gradients are in place; the optimizer has not run."""

    def after_decision(self, trainer: Trainer, decision: Decision) -> None:
        """The step's agreed decision (rollback, stop, ...), not yet acted upon."""

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """The step is done; ``metrics`` is what :meth:`Trainer.run_step` returns."""


def reduce_metrics(recorded: Mapping[str, tuple[float, Reduce]], world_size: int) -> dict:
    """Recorded metrics as logged: ``mean``/``sum``/``max`` agreed across ranks (one
    all-reduce per kind present, names in sorted order), ``None`` this rank's value."""
    out = {name: value for name, (value, how) in recorded.items() if how is None}
    for how in ("mean", "sum", "max"):
        names = sorted(n for n, (_, h) in recorded.items() if h == how)
        if not names:
            continue
        values = all_reduce_floats(
            [recorded[n][0] for n in names], "max" if how == "max" else "sum"
        )
        if how == "mean":
            values = [v / world_size for v in values]
        out.update(zip(names, values, strict=True))
    return {name: out[name] for name in recorded}  # in recording order


def _on_device(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    """The batch on the engine's device (a no-op on CPU)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """One job on one rank. ``run()`` trains to the end and returns the summary;
    :meth:`run_step` is one optimizer step (``step_hooks`` observe each). ``techniques``
    replaces the recipe's (tests of the interface; the default builds the recipe's)."""

    def __init__(
        self,
        recipe: Recipe,
        ctx: WorkerContext,
        step_hooks: Iterable[StepHook] = (),
        techniques: list[Technique] | None = None,
    ) -> None:
        self.recipe = recipe
        self.ctx = ctx
        self.step_hooks = list(step_hooks)
        self.rundir = RunDir(ctx.run_dir)
        self.mirror = (
            CheckpointMirror(run_storage_uri(recipe.checkpoint.storage, ctx.run_dir.name))
            if is_remote(recipe.checkpoint.storage)
            else None
        )
        self.store = CheckpointStore(
            self.rundir.checkpoints,
            keep=recipe.checkpoint.keep,
            rank=ctx.rank,
            world_size=ctx.world_size,
            protect=self._protected,
            on_commit=self._mirror_commit if self.mirror is not None else None,
        )
        self.techniques = build_techniques(recipe) if techniques is None else list(techniques)
        # fixed for the job (and the same on every rank): which techniques may decide
        self._deciders = {
            cap: [t for t in self.techniques if has(t, cap)]
            for cap in (Capability.DECIDES_BEFORE_STEP, Capability.DECIDES_AFTER_STEP)
        }
        self.loop = LoopState()
        self.protected_steps: set[int] = set()
        self.reporter = Reporter(
            self.rundir, ctx.rank, ctx.tracking_uri, ctx.run_id, node_id=ctx.node_id
        )
        self.state = TrainState(
            recipe=recipe,
            total_steps=recipe.schedule.steps,
            rank=ctx.rank,
            world_size=ctx.world_size,
            lr=recipe.optimizer.lr,
            run_dir=str(ctx.run_dir),
            on_event=lambda kind, payload: self.emit(kind, **payload),
        )
        self.eval_results: dict[str, float] = {}
        self.last_decision = Decision()
        self.last_recovery_s = 0.0
        self._prev_start = 0.0
        self.step_clock = StepClock()  # the time/* split of each logged step
        self._local_loss = float("nan")  # this rank's loss of the step in progress (replay)
        self.timeline = Timeline(ctx.marks)  # where start-up and the end go (summary["startup"])

    @property
    def events(self) -> list[dict[str, Any]]:
        """The run's event log so far."""
        return self.reporter.events

    @property
    def sink(self) -> Any:
        """Rank 0's MLflow metric sink (None elsewhere or untracked)."""
        return self.reporter.sink

    def emit(self, kind: str, **payload: Any) -> None:
        """An event at the current step."""
        self.reporter.emit(kind, self.state.step, payload)

    # -- setup -------------------------------------------------------------------------------
    def _protected(self, step: int) -> bool:
        return recovery.protected(
            step, self.protected_steps, self.techniques, self.state.step, self.store
        )

    def _build(self) -> None:
        recipe, ctx, state = self.recipe, self.ctx, self.state
        recovery.check_not_stopped(self.rundir)
        torch.set_num_threads(
            recipe.resources.threads_per_worker or max(1, int(recipe.resources.cpus_per_worker))
        )
        recovery.seed_everything(recipe.seed)
        self.data = build_data(recipe.data, recipe.model.tokenizer_path)
        self.batches: BatchStream = BatchSource(
            self.data.train, recipe.seed, recipe.schedule.micro_batch_size, ctx.rank, ctx.world_size
        )
        self.task = task_for(recipe.model)
        self.model = build_task_model(recipe.model, recipe.seed, attention_implementation(recipe))
        self.timeline.mark("worker.model")
        self.context = Context(
            recipe=recipe, state=state, model=self.model, task=self.task, data=self.data,
            rank=ctx.rank, world_size=ctx.world_size, engine_of=self._engine,
            replay=lambda: replay_step(self, self._local_loss),
        )  # fmt: skip
        for technique in self.techniques:
            technique.bind(self.context)
        for technique in self.techniques:
            if has(technique, Capability.SUPPLIES_DATA):
                self.batches = technique.wrap_batches(self.batches, self.context)
        if ctx.resume_step != -1:
            recovery.pull_from_remote(self.mirror, self.store, ctx.rank, ctx.resume_step, self.emit)
        resume = self.store.latest(ctx.resume_step) if ctx.resume_step != -1 else None
        saved = self.store.load_rank_state(resume, ctx.rank) if resume else None
        if saved is not None:
            recovery.load_techniques(self.techniques, saved)
        self.built = initialize_engine(
            self.model, self.techniques, recipe, ctx.rank, ctx.world_size
        )
        self.timeline.mark("worker.engine")
        self.throughput = Throughput.for_run(
            self.model, self.built.engine.device, recipe.precision, ctx.world_size
        )
        if resume is not None and saved is not None:
            self.store.load_engine(self.built.engine, resume)
            recovery.restore_loop(state, self.loop, saved)
            self.emit("resume", from_step=resume.step, checkpoint=str(resume.path))
            for technique in self.techniques:
                technique.on_checkpoint_loaded(state, resume.step)
        recovery.apply_manual_segment(self.rundir, state, self.loop, self.emit)

    def _engine(self) -> Any:
        built = getattr(self, "built", None)
        return built.engine if built is not None else None

    def _mirror_commit(self, info: CheckpointInfo, removed_steps: list[int]) -> None:
        """Rank 0, after each commit: copy the checkpoint to `checkpoint.storage`, and drop
        there what retention just dropped here."""
        if self.mirror is None:  # only installed with a mirror
            return
        self.mirror.push(info.step, info.path, info.manifest)
        self.mirror.remove(removed_steps)

    # -- steps -------------------------------------------------------------------------------
    def _apply_lr(self) -> None:
        lr = self.state.lr * self.state.lr_scale
        for group in self.built.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_multiplier", 1.0)

    def _skip_data_ranges(self) -> None:
        for start, end in self.loop.skip_ranges:
            if start <= self.loop.cursor < end:
                self.emit("skip_data", start=self.loop.cursor, end=end)
                self.loop.cursor = end

    def _decide(self, capability: Capability, decisions: list[Decision]) -> Decision:
        """The decisions of one verdict hook (technique order) combined, agreed across ranks.

        Only techniques that declare ``capability`` may decide; the technique list is the
        same on every rank, so with none declaring it every rank knows the answer without
        the all-reduce (two collectives a step saved in plain runs)."""
        deciders = self._deciders[capability]
        for technique, decision in zip(self.techniques, decisions, strict=True):
            if decision.action != Action.PROCEED and technique not in deciders:
                raise RuntimeError(
                    f"technique {technique.name!r} returned {decision.action.name} without "
                    f"declaring Capability.{capability.name}"
                )
        if not deciders:
            return Decision()
        return self._agree_decision(combine(decisions))

    def _agree_decision(self, local: Decision) -> Decision:
        """The all-ranks maximum action; this rank's details when it decided that action."""
        # a retry rides on the action as +0.5: the maximum keeps it only if no rank asked more
        top = all_reduce_floats([float(local.action) + 0.5 * local.retry], "max")[0]
        agreed, retry = Action(int(top)), top % 1.0 > 0.25
        if agreed == local.action:
            return local if local.retry == retry else replace(local, retry=retry)
        return Decision(agreed, reason={"decided_on": "another rank"}, retry=retry)

    def run_step(self) -> dict[str, float]:
        """One optimizer step with every technique hook; the step's metrics."""
        for hook in self.step_hooks:
            hook.before_step(self)
        metrics = self._step()
        for hook in self.step_hooks:
            hook.after_step(self, metrics)
        return metrics

    def _step(self) -> dict[str, float]:
        state, schedule, techniques = self.state, self.recipe.schedule, self.techniques
        started = time.perf_counter()
        clock = self.step_clock
        clock.begin(self.built.engine.device)
        state._begin_step()
        for technique in techniques:
            technique.on_step_begin(state)
        if state._take_rebuild():
            self.rebuild_engine()
        engine = self.built.engine  # after a rebuild: the new one (the old one is freed)
        self._apply_lr()
        self._skip_data_ranges()
        state._update(cursor=self.loop.cursor)
        engine.train()
        loss_sum = 0.0
        for micro in range(schedule.grad_accumulation):
            clock.mark()
            batch = _on_device(self.batches.micro_batch_at(self.loop.cursor, micro), engine.device)
            self.throughput.count(batch)
            clock.lap("data")
            loss = self.task.loss(engine, batch)
            clock.lap("forward")
            engine.backward(loss)
            clock.lap("backward")
            loss_sum += float(loss.detach())
            if micro < schedule.grad_accumulation - 1:
                clock.mark()
                engine.step()
                clock.lap("optimizer")
        self._local_loss = loss_sum / schedule.grad_accumulation
        loss_avg = all_reduce_floats([self._local_loss])[0] / self.ctx.world_size
        state._update(loss=loss_avg)
        for hook in self.step_hooks:
            hook.before_optimizer_step(self)
        before = self._decide(
            Capability.DECIDES_BEFORE_STEP, [t.on_before_optimizer_step(state) for t in techniques]
        )
        clock.mark()
        skipped = self.built.gate.engine_step(engine, skip=before.action >= Action.SKIP_STEP)
        clock.lap("optimizer")
        self.loop.skipped_steps += int(skipped)
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        state._update(grad_norm=grad_norm, step=state.step + 1)
        if not (before.action == Action.SKIP_STEP and before.retry):  # a retry redraws it
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
            **self.throughput.metrics(elapsed, self.ctx.world_size),
            "skipped": float(skipped),
            **state.metrics,
        }
        if state.step % schedule.log_every == 0:  # logged: the split (on CUDA, its one wait)
            metrics.update(clock.metrics())
        view = MappingProxyType(dict(metrics))
        ends = [t.on_step_end(state, view) for t in techniques]
        metrics.update(reduce_metrics(state._take_metrics(), self.ctx.world_size))
        end = self._decide(Capability.DECIDES_AFTER_STEP, ends)
        if before.action >= Action.ROLLBACK:  # a rollback/stop decided before the update
            end = combine([before, end])
        self.last_decision = end
        for hook in self.step_hooks:
            hook.after_decision(self, end)
        if end.action == Action.ROLLBACK:
            self.reporter.log(state.step, metrics)  # the spike's metrics stay in its segment
            recovery.rollback(self, end)
        elif end.action == Action.STOP:
            reason = end.message or f"a technique stopped training at step {state.step}"
            stopped = Stopped(state.step, reason, end.bad_rank)
            recovery.record_stop(self.rundir, self.ctx.rank, stopped)
            raise recovery.stop_error(stopped)
        return metrics

    def rebuild_engine(self) -> None:
        """Release the engine (freeing its optimizer state), then build a new one on the module."""
        started = time.perf_counter()
        module = self.built.engine.module
        release_engine(self.built.engine)
        self.built = None  # type: ignore[assignment]
        gc.collect()
        self.built = initialize_engine(
            module, self.techniques, self.recipe, self.ctx.rank, self.ctx.world_size
        )
        self.state.record("engine_rebuild_s", time.perf_counter() - started)

    # -- eval, checkpoints -------------------------------------------------------------------
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
        self.eval_results = eval_metrics(all_reduce_floats(sums), self.task)
        return self.eval_results["eval_loss"]

    def checkpoint(self, final: bool = False) -> CheckpointInfo | None:
        """Write a checkpoint of the current step (collective). With ``checkpoint.async`` (and
        not ``final``) only the host snapshot blocks; None is returned, the write commits in
        the background (``self.store.wait()`` before anything reads checkpoints)."""
        self.reporter.flush(timeout_s=5.0)
        step = self.state.step
        args = (
            self.built.engine,
            step,
            recovery.rank_state(self.state, self.loop, self.techniques),
        )
        meta = {"cursor": self.loop.cursor}
        info: CheckpointInfo | None = None
        if self.recipe.checkpoint.is_async and not final:
            pending = self.store.save_async(*args, meta=meta)
            path = str(self.store.path_of(pending.step))
            self.emit("checkpoint", path=path, blocked_s=pending.blocked_s, mode="async")
        else:
            info = self.store.save(*args, meta=meta)
            path = str(info.path)
            self.emit("checkpoint", path=path, blocked_s=self.store.last_blocked_s)
        for technique in self.techniques:
            technique.on_checkpoint_saved(self.state, step, path)
        return info

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train from the latest checkpoint (if any) to ``schedule.steps``; return the summary.

        Techniques get ``on_error`` when the run fails and ``close`` always."""
        status = "FAILED"
        try:
            self._build()
            self.reporter.open(self.recipe, self.data, self.built.engine, self.ctx.world_size)
            self.timeline.mark("worker.tracking")
            summary = self._train()
            status = "FINISHED" if summary["finished"] else "KILLED"
            return summary
        except BaseException as exc:
            for technique in self.techniques:
                with contextlib.suppress(Exception):
                    technique.on_error(self.state, exc)
            raise
        finally:
            try:
                self.store.wait(collective=False)  # never exit with an async save in flight
            except Exception:
                if status != "FAILED":
                    raise
            finally:
                self.reporter.close(status)
                self._close_techniques(raise_errors=status != "FAILED")
                self.timeline.mark("worker.closed")

    def _close_techniques(self, raise_errors: bool) -> None:
        errors: list[Exception] = []
        for technique in self.techniques:
            try:
                technique.close()
            except Exception as exc:
                errors.append(exc)
        if errors and raise_errors:
            raise errors[0]

    def _train(self) -> dict[str, Any]:
        state, recipe, ctx = self.state, self.recipe, self.ctx
        for technique in self.techniques:
            technique.on_train_start(state)
        last_metrics: dict[str, float] = {}
        every = recipe.checkpoint.every
        steps_this_run = 0
        evaluated_at = -1
        while state.step < recipe.schedule.steps:
            last_metrics = self.run_step()
            steps_this_run += 1
            if steps_this_run == 1:
                self.timeline.mark("worker.first_step")
            if self.last_decision.action == Action.ROLLBACK:
                continue  # already logged at the spike's step; nothing to checkpoint
            due = recipe.schedule.eval_every and state.step % recipe.schedule.eval_every == 0
            if due and self.evaluate() is not None:
                last_metrics.update(self.eval_results)
                evaluated_at = state.step
            if state.step % recipe.schedule.log_every == 0:
                self.reporter.log(state.step, last_metrics)
            if ctx.on_progress is not None and ctx.rank == 0:
                ctx.on_progress(
                    {"step": state.step, "total": recipe.schedule.steps, "loss": state.loss}
                )
            if every and state.step % every == 0 and state.step < recipe.schedule.steps:
                self.checkpoint()
            if ctx.stop_after_steps is not None and steps_this_run >= ctx.stop_after_steps:
                return self._summary(last_metrics, None, finished=False)
        self.timeline.mark("worker.steps_done")
        # the last step's periodic eval already measured this model: one eval_loss point a step
        eval_loss = self.evaluate() if evaluated_at != state.step else None
        final = self.checkpoint(final=True) if recipe.checkpoint.at_end else None
        self.timeline.mark("worker.checkpoint")
        state._begin_step()  # what techniques record at the end is logged at the last step
        for technique in self.techniques:
            technique.on_train_end(state)
        self.reporter.log(state.step, reduce_metrics(state._take_metrics(), ctx.world_size))
        if eval_loss is not None:
            last_metrics.update(self.eval_results)
            self.reporter.log(state.step, dict(self.eval_results))
        exported = self.export()
        self.timeline.mark("worker.exported")
        return self._summary(last_metrics, final, finished=True, exported=exported)

    def export(self) -> dict[str, Any] | None:
        """The end of a finished run (collective): the final model to ``<run dir>/export/``
        as a Hugging Face directory (``checkpoint.export``, HF models only), mirrored to
        ``checkpoint.storage``, logged to MLflow (``tracking.log_model``; MLflow refusing
        it is recorded in the ``export`` event, the run stands).
        Rank 0 returns where it went (``path``, ``uri``, ``model_id``); other ranks None."""
        recipe, ctx = self.recipe, self.ctx
        if not (recipe.checkpoint.export and exportable(recipe.model)):
            return None
        started = time.perf_counter()
        path = export_model(
            self.built.engine,
            self.rundir.export,
            recipe.model.tokenizer_path,
            rank=ctx.rank,
            record={"step": self.state.step, "source": "engine", "run_id": ctx.run_id},
        )
        if path is None:
            return None
        out: dict[str, Any] = {"path": str(path)}
        if self.mirror is not None:
            out["uri"] = push_export(
                recipe.checkpoint.storage, ctx.run_dir.name, path, exported_files(path),
                EXPORT_RECORD,
            )  # fmt: skip
        if self.reporter.tracked and recipe.tracking.log_model:
            from orchestrator.tracking.model import log_hf_model

            try:  # the driver links the run's final metrics to it (log_summary)
                out["model_id"] = log_hf_model(
                    ctx.tracking_uri or "", ctx.run_id or "", path, step=self.state.step
                )
            except TrackingError as exc:  # MLflow down: the model is on disk; the run stands
                out["log_error"] = str(exc)
                log.warning("the exported model %s is not in MLflow: %s", path, exc)
        self.emit("export", **out, seconds=round(time.perf_counter() - started, 3))
        return out

    def _summary(
        self,
        metrics: dict[str, float],
        final: CheckpointInfo | None,
        finished: bool,
        exported: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        summary = {
            "steps": self.state.step,
            "final_loss": metrics.get("loss"),
            "eval_loss": metrics.get("eval_loss"),
            "eval_accuracy": metrics.get("eval_accuracy"),
            "rollbacks": self.loop.rollbacks,
            "skipped_steps": self.loop.skipped_steps,
            "checkpoint": str(final.path) if final else None,
            "export": exported,
            "finished": finished,
            "data_fingerprint": self.data.fingerprint,
            "events": self.events,
            "startup": self.timeline.marks,  # live: the marks of closing join it
        }
        for technique in self.techniques:
            if has(technique, Capability.SUMMARIZES):
                summary.update(technique.summary())
        self.reporter.write_summary(summary)
        return summary


def train(recipe: Recipe, ctx: WorkerContext) -> dict[str, Any]:
    """Run one job on this rank (the function every worker calls, ``cluster.launch.run_rank``).

    The engine is released at the end, so a warm worker process that runs the next job
    holds nothing of this one (its optimizer state, ZeRO hooks)."""
    RunDir(ctx.run_dir).create()
    trainer = Trainer(recipe, ctx)
    try:
        return trainer.run()
    finally:
        built = getattr(trainer, "built", None)
        if built is not None:
            release_engine(built.engine)
            trainer.built = None  # type: ignore[assignment]
        del trainer  # collected before this process's next job (RankWorker), not on the way out
