"""Fault injection for tests and demos (`techniques.fault_injection`).

Faults, each by step index (the 0-based optimizer step being run):

* ``nan_at_step``: the loss of that step becomes NaN (so are its gradients).
* ``spike_at_step`` + ``spike_steps`` + ``spike_factor``: the loss tensor is multiplied by
  the factor for ``spike_steps`` steps: the spike is real (gradients scale with it).
* ``transient_spike_at_step``: the loss of that step's first pass (its micro-batches) is
  multiplied by ``spike_factor``; a re-run of the step (the spike guard's replay) is clean,
  like a bit flip on one pass of a bad GPU. With ``transient_spike_env``, only on the
  ranks whose environment sets that variable (one node of a test cluster).
* ``poison_samples: [start, end)``: every global batch holding one of these stream positions
  has its loss multiplied by ``spike_factor`` each time it is drawn (replays and retries
  included): bad data, a spike that reproduces.
* ``grad_blowup_at_step`` + ``grad_factor``: the loss value is unchanged but its gradient is
  multiplied by the factor (an identity with a scaled backward), on every ZeRO stage.
* ``nan_grad_at_step`` on ``nan_grad_rank``: that rank's gradients become NaN (a scaled
  backward), the loss value stays finite (a faulty device: NaN in one rank's gradients only).
* ``diverge_at_step`` + ``diverge_steps`` + ``diverge_factor``: a slow divergence; from that
  step the loss tensor is multiplied by a factor rising linearly from 1 to
  ``diverge_factor`` over ``diverge_steps`` steps, then held (until a rollback).
* ``corrupt_batch_at_step``: that step's token ids (and the labels that are not ignored)
  are replaced by uniform random tokens, seeded by the step (a corrupted batch).
* ``kill_at_step`` on ``kill_rank``: ``kill_mode: exit`` ends the worker process at once
  (``os._exit``, like an OOM kill); ``raise`` raises an error in the worker.
* ``kill_in_checkpoint_at_step``: ends the process on ``kill_rank`` while the checkpoint of
  that step is being written (after DeepSpeed's files, before the manifest commit).

Each fault fires once per run, even across rollbacks (the technique is not rolled back)
and process restarts (a marker file ``<run_dir>/faults/<fault>.fired``, read at train
start, written by the firing rank before it acts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from orchestrator.recipe import catalog
from orchestrator.recipe.techniques.fault_injection import FaultInjectionConfig
from orchestrator.rundir import RunDir
from orchestrator.techniques.base import (
    BatchStream,
    Capability,
    Context,
    Decision,
    Setup,
    Technique,
    TrainState,
)
from orchestrator.techniques.registry import TechniqueSpec

FAULTS = (
    "nan",
    "spike",
    "transient_spike",
    "grad_blowup",
    "nan_grad",
    "diverge",
    "corrupt_batch",
    "kill",
    "kill_in_checkpoint",
)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class FaultInjection(Technique):
    """Wraps the model's forward to corrupt the loss; kills processes on cue."""

    name = "fault_injection"
    # fired faults stay fired across rollbacks
    capabilities = frozenset(
        {Capability.CONFIGURES, Capability.KEEPS_STATE_ON_ROLLBACK, Capability.SUPPLIES_DATA}
    )

    def __init__(self, cfg: FaultInjectionConfig):
        self.cfg = cfg
        self.ctx: Context | None = None
        self.fired: list[str] = []
        self.rank = 0
        self.run_dir: Path | None = None
        self._loss_factor = 1.0  # for the current step
        self._grad_factor = 1.0
        self._spike_until = -1
        self._transient_passes = 0  # forward passes the transient spike still corrupts
        self._poisoned = False  # the micro-batch just drawn holds poisoned samples
        self._diverge_from = -1
        self._corrupt_seed: int | None = None

    # -- helpers -----------------------------------------------------------------------------
    def _marker(self, fault: str) -> Path | None:
        return RunDir(self.run_dir).faults / f"{fault}.fired" if self.run_dir else None

    def _fire(self, fault: str, state: TrainState, mark: bool = True) -> None:
        self.fired.append(fault)
        marker = self._marker(fault)
        if mark and marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"step {state.step} rank {state.rank}\n")
        state.emit("fault_injected", fault=fault, at_step=state.step, rank=state.rank)

    def _kill(self, what: str) -> None:
        if self.cfg.kill_mode == "raise":
            raise RuntimeError(f"fault injection: {what}")
        os._exit(17)

    # -- hooks -------------------------------------------------------------------------------
    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def configure(self, setup: Setup) -> None:
        model, technique = setup.model, self
        if getattr(model, "_regimen_fault_wrapped", False):
            return
        original = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if technique._corrupt_seed is not None:
                kwargs = _corrupted(model, kwargs, technique._corrupt_seed)
            out = original(*args, **kwargs)
            transient = technique._transient_passes > 0 and torch.is_grad_enabled()
            plain = technique._loss_factor == 1.0 and technique._grad_factor == 1.0
            if plain and not transient and not technique._poisoned:
                return out
            loss = out if isinstance(out, torch.Tensor) else out.loss
            if technique._poisoned:
                loss = loss * technique.cfg.spike_factor
            if transient:
                technique._transient_passes -= 1
                loss = loss * technique.cfg.spike_factor
            if technique._loss_factor != 1.0:
                loss = loss * technique._loss_factor
            if technique._grad_factor != 1.0:
                loss = _ScaleGrad.apply(loss, technique._grad_factor)
            if isinstance(out, torch.Tensor):
                return loss
            out.loss = loss
            return out

        model.forward = forward  # type: ignore[method-assign]
        model._regimen_fault_wrapped = True  # type: ignore[attr-defined,assignment]

    def on_train_start(self, state: TrainState) -> None:
        self.rank = state.rank
        self.run_dir = Path(state.run_dir) if state.run_dir else None
        for fault in FAULTS:
            marker = self._marker(fault)
            if marker is not None and marker.exists() and fault not in self.fired:
                self.fired.append(fault)
        step_at = self.cfg.kill_in_checkpoint_at_step
        engine = self.ctx.engine if self.ctx is not None else None
        if step_at is not None and engine is not None and "kill_in_checkpoint" not in self.fired:
            save, technique = engine.save_checkpoint, self

            def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
                result = save(*args, **kwargs)
                if state.step == step_at and "kill_in_checkpoint" not in technique.fired:
                    technique.fired.append("kill_in_checkpoint")
                    if state.rank == technique.cfg.kill_rank:
                        technique._fire("kill_in_checkpoint", state)
                        technique._kill(f"killed while writing checkpoint {step_at}")
                return result

            engine.save_checkpoint = save_checkpoint

    def on_step_begin(self, state: TrainState) -> None:
        cfg, step = self.cfg, state.step
        self._loss_factor = self._grad_factor = 1.0
        if cfg.kill_at_step == step and "kill" not in self.fired:
            if state.rank == cfg.kill_rank:
                self._fire("kill", state)
                self._kill(f"killed at step {step} on rank {state.rank}")
            self.fired.append("kill")
        if cfg.nan_at_step == step and "nan" not in self.fired:
            self._fire("nan", state, mark=state.rank == 0)
            self._loss_factor = float("nan")
        if cfg.spike_at_step == step and "spike" not in self.fired:
            self._fire("spike", state, mark=state.rank == 0)
            self._spike_until = step + cfg.spike_steps
        if step < self._spike_until:
            self._loss_factor *= cfg.spike_factor
        if cfg.transient_spike_at_step == step and "transient_spike" not in self.fired:
            self._fire("transient_spike", state, mark=state.rank == 0)
            only = cfg.transient_spike_env  # a faulty node: only its ranks see the fault
            if only is None or os.environ.get(only):
                self._transient_passes = state.recipe.schedule.grad_accumulation
        if cfg.grad_blowup_at_step == step and "grad_blowup" not in self.fired:
            self._fire("grad_blowup", state, mark=state.rank == 0)
            self._grad_factor = cfg.grad_factor
        if cfg.nan_grad_at_step == step and "nan_grad" not in self.fired:
            self._fire("nan_grad", state, mark=state.rank == 0)
            if state.rank == cfg.nan_grad_rank:
                self._grad_factor *= float("nan")
        if cfg.diverge_at_step == step and "diverge" not in self.fired:
            self._fire("diverge", state, mark=state.rank == 0)
            self._diverge_from = step
        if 0 <= self._diverge_from <= step:
            ramp = min(1.0, (step - self._diverge_from + 1) / cfg.diverge_steps)
            self._loss_factor *= 1.0 + (cfg.diverge_factor - 1.0) * ramp
        self._corrupt_seed = None
        if cfg.corrupt_batch_at_step == step and "corrupt_batch" not in self.fired:
            self._fire("corrupt_batch", state, mark=state.rank == 0)
            self._corrupt_seed = 1_000_003 * step + state.rank

    def wrap_batches(self, batches: BatchStream, ctx: Context) -> BatchStream:
        """With ``poison_samples``: the global batches holding them are poisoned."""
        if self.cfg.poison_samples is None:
            return batches
        return _Poisoned(batches, self, ctx.recipe.global_batch_size)

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> Decision:
        self._loss_factor = self._grad_factor = 1.0
        self._transient_passes = 0
        self._poisoned = False
        self._corrupt_seed = None
        return Decision()

    def on_rollback(self, state: TrainState, step: int) -> None:
        # the spike window and the divergence belong to the abandoned timeline
        self._spike_until = self._diverge_from = -1

    def state_dict(self) -> dict[str, Any]:
        return {
            "fired": list(self.fired),
            "spike_until": self._spike_until,
            "diverge_from": self._diverge_from,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.fired = list(dict.fromkeys([*self.fired, *state["fired"]]))
            self._spike_until = int(state["spike_until"])
            self._diverge_from = int(state.get("diverge_from", -1))


def _corrupted(model: torch.nn.Module, kwargs: dict[str, Any], seed: int) -> dict[str, Any]:
    """``kwargs`` with ``input_ids`` (and the labels that are not ignored, when they are the
    tokens) replaced by uniform random tokens of the model's vocabulary."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return kwargs
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or int(ids.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, int(vocab), ids.shape, generator=gen).to(ids.device, ids.dtype)
    out = {**kwargs, "input_ids": noise}
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
        out["labels"] = torch.where(labels == -100, labels, noise)
    return out


class _Poisoned:
    """A batch stream whose global batches overlapping ``[start, end)`` are poisoned: while
    one is drawn, the fault injection's forward scales the loss (every time it is drawn)."""

    def __init__(self, inner: BatchStream, owner: FaultInjection, global_batch: int):
        self.inner, self.owner, self.global_batch = inner, owner, global_batch

    def micro_batch_at(self, cursor: int, micro: int) -> dict[str, Any]:
        poison = self.owner.cfg.poison_samples
        if poison is not None:
            start, end = poison
            self.owner._poisoned = cursor < end and start < cursor + self.global_batch
        return self.inner.micro_batch_at(cursor, micro)


SPEC = TechniqueSpec(catalog.FAULT_INJECTION, build=lambda cfg, recipe: FaultInjection(cfg))
