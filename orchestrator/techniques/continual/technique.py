"""The `continual:` section as a technique: stages, replay, continual evaluation.

An ordinary technique (section ``continual``): its state (the replay buffer, the
per-task score table and the stage position) goes into every checkpoint's rank state,
comes back on resume, and comes back with the weights on a spike-guard rollback. It uses
the interface's data and summary hooks:

* ``wrap_batches`` (SUPPLIES_DATA): builds the stages' data and supplies the loop's batch
  stream, a :class:`~orchestrator.techniques.continual.stages.StageBatches`;
* ``summary`` (SUMMARIZES): the final continual metrics, under ``continual`` in the summary.

Per step (``on_step_end``) every rank offers the step's fresh samples (all ranks', same
order) to its buffer, and every ``eval.every`` steps and at each stage's last step the
model is evaluated on each seen task's fixed subset: ``cl/acc/task_i`` (``cl/loss/task_i``
for language models), ``cl/eval_time_share``. At the end the metrics of
:mod:`orchestrator.techniques.continual.metrics` are logged as ``cl/final/*`` and put in
the summary.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.data import collate
from orchestrator.distributed import all_reduce_floats
from orchestrator.recipe import catalog
from orchestrator.recipe.techniques.continual import ContinualConfig
from orchestrator.techniques.base import (
    BatchStream,
    Capability,
    Context,
    Decision,
    Technique,
    TrainState,
)
from orchestrator.techniques.continual.metrics import summarize
from orchestrator.techniques.continual.replay import ReplayBuffer
from orchestrator.techniques.continual.stages import Stage, StageBatches, build_stages, stage_at
from orchestrator.techniques.registry import TechniqueSpec

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


class Continual(Technique):
    """Stage schedule, replay buffer and continual evaluation (see the module docstring)."""

    name = "continual"
    capabilities = frozenset({Capability.SUPPLIES_DATA, Capability.SUMMARIZES})

    def __init__(self, cfg: ContinualConfig, recipe: Recipe):
        self.cfg = cfg
        self.recipe = recipe
        self.buffer = ReplayBuffer(cfg.replay.size, cfg.replay.policy, recipe.seed)
        self.ends = [sum(s.steps for s in cfg.stages[: i + 1]) for i in range(len(cfg.stages))]
        self.table: dict[int, dict[int, float]] = {}
        self.stages: list[Stage] = []
        self.batches: StageBatches | None = None
        self.ctx: Context | None = None
        self.final: dict[str, float] = {}
        self.higher_is_better = recipe.model.task == "classification"
        self._t0 = time.perf_counter()
        self._eval_s = 0.0

    # -- technique hooks -----------------------------------------------------------------
    def bind(self, ctx: Context) -> None:
        """Keep the job's live objects (engine, task, rank) for the continual evaluation."""
        self.ctx = ctx

    def wrap_batches(self, batches: BatchStream, ctx: Context) -> BatchStream:
        """Build the stages' data; the loop's micro-batches come from them from now on."""
        self.ctx = ctx
        self.stages = build_stages(self.cfg, self.recipe)
        s = self.recipe.schedule
        state = ctx.state
        self.batches = StageBatches(
            self.stages,
            self.buffer,
            self.cfg.replay.ratio,
            seed=self.recipe.seed,
            micro_batch=s.micro_batch_size,
            grad_accumulation=s.grad_accumulation,
            rank=ctx.rank,
            world_size=ctx.world_size,
            step_of=lambda: int(state.step),
        )
        return self.batches

    def on_train_start(self, state: TrainState) -> None:
        """Start the wall clock that ``cl/eval_time_share`` divides by."""
        self._t0, self._eval_s = time.perf_counter(), 0.0

    def on_step_begin(self, state: TrainState) -> None:
        """Announce a stage switch; restart the LR schedule where the stage asks."""
        if not self.stages:
            return
        stage = stage_at(self.stages, state.step)
        if state.step == stage.start:
            state.emit("stage", stage=stage.name, index=stage.index, end=stage.end)
            if stage.index > 0:  # a new task's loss is not a spike
                state.mark_regime_change()
        state.record("cl/stage", float(stage.index))
        warm = getattr(self.recipe.techniques, "warmup", None)
        if stage.restart_schedule and warm is not None and warm.enabled:
            from orchestrator.techniques.warmup import scheduled_lr

            peak = self.recipe.optimizer.lr
            state.set_lr(scheduled_lr(warm, peak, state.step - stage.start, stage.steps))

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> Decision:
        """Feed the buffer with the step's fresh samples; evaluate when due."""
        if self.batches is None:
            return Decision()
        step = state.step - 1  # the step that just ran
        if not metrics.get("skipped"):
            for task, index, label in self.batches.fresh_ids(state.cursor, step):
                self.buffer.add(task, index, label)
        state.record("cl/buffer_size", float(len(self.buffer)))
        every = self.cfg.eval.every
        if (every and state.step % every == 0) or state.step in self.ends:
            for name, value in self.evaluate(state).items():
                state.record(name, value)
        return Decision()

    def on_train_end(self, state: TrainState) -> None:
        """Compute the final metrics; record them as ``cl/final/*`` (logged at the last step)."""
        if not self.stages:
            return
        if not any(state.step in series for series in self.table.values()):
            self.evaluate(state)
        self.final = summarize(self.table, self.ends, state.step, self.higher_is_better)
        for name, value in self.final.items():
            state.record(f"cl/final/{name}", value)

    @torch.no_grad()
    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Score every seen task (all with ``include_future``) on its fixed eval subset."""
        started = time.perf_counter()
        if self.ctx is None:
            raise RuntimeError("continual: evaluate() before bind()")
        engine, task = self.ctx.engine, self.ctx.task
        mb = self.recipe.schedule.micro_batch_size
        rank, world = self.ctx.rank, self.ctx.world_size
        current = stage_at(self.stages, max(0, state.step - 1)).index
        tasks = range(len(self.stages)) if self.cfg.eval.include_future else range(current + 1)
        sums: list[float] = []
        engine.eval()
        for t in tasks:
            stage = self.stages[t]
            mine = stage.eval_subset[rank::world]
            loss = correct = count = 0.0
            for b in range(0, len(mine), mb):
                chunk = mine[b : b + mb]
                batch = collate([stage.eval[i] for i in chunk])
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                got = task.eval_batch(engine, batch)
                loss, correct, count = (
                    loss + got.loss * len(chunk),
                    correct + got.correct,
                    count + len(chunk),
                )
            sums += [loss, correct, count]
        engine.train()
        sums = all_reduce_floats(sums)
        out: dict[str, float] = {}
        kind = "acc" if self.higher_is_better else "loss"
        for j, t in enumerate(tasks):
            loss, correct, count = sums[3 * j : 3 * j + 3]
            value = (correct if self.higher_is_better else loss) / max(1.0, count)
            self.table.setdefault(t, {})[state.step] = value
            out[f"cl/{kind}/task_{t}"] = value
        seen = [out[f"cl/{kind}/task_{t}"] for t in range(current + 1)]
        out[f"cl/{kind}/seen_avg"] = sum(seen) / len(seen)
        self._eval_s += time.perf_counter() - started
        out["cl/eval_time_share"] = self._eval_s / max(1e-9, time.perf_counter() - self._t0)
        return out

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Replay buffer, score table and stage position."""
        step = self.ctx.state.step if self.ctx is not None else 0
        stage = stage_at(self.stages, step) if self.stages else None
        return {
            "buffer": self.buffer.state_dict(),
            "table": {t: dict(series) for t, series in sorted(self.table.items())},
            "stage": stage.index if stage else 0,
            "stage_step": step - stage.start if stage else step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the stage follows from the restored step)."""
        if not state:
            return
        self.buffer.load_state_dict(state["buffer"])
        self.table = {
            int(t): {int(n): float(v) for n, v in s.items()} for t, s in state["table"].items()
        }

    def summary(self) -> dict[str, Any]:
        """``{"continual": {...}}`` (final metrics, stages, score table, buffer), or ``{}``."""
        if not self.stages:
            return {}
        return {
            "continual": {
                "metrics": self.final,
                "stages": [
                    {"name": s.name, "start": s.start, "end": s.end, "classes": s.classes}
                    for s in self.stages
                ],
                "table": {str(t): {str(n): v for n, v in s.items()} for t, s in self.table.items()},
                "buffer": {"size": len(self.buffer), "counts": self.buffer.counts()},
            }
        }


SPEC = TechniqueSpec(catalog.CONTINUAL, build=Continual)
