"""Fault injection in-process (world size 1): real spikes, NaN, grad blow-up, once-only kills."""

from __future__ import annotations

import math

import pytest

from conftest import tiny_recipe
from orchestrator.engine.checkpoint import CheckpointStore
from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
from orchestrator.errors import CheckpointError


def _trainer(tmp_path, name, faults=None, steps=4, every=2):
    sections = {"schedule": {"steps": steps}, "checkpoint": {"every": every}}
    if faults is not None:
        sections["techniques"] = {"fault_injection": faults}
    return Trainer(tiny_recipe(tmp_path, **sections), WorkerContext(run_dir=tmp_path / name))


def _trace(trainer):
    """Run and return (loss, gradient norm before the update) of every step."""
    seen, norms = [], []

    class Spy(StepHook):
        def before_optimizer_step(self, trainer):  # after backward, before the update
            grads = [p.grad for p in trainer.built.engine.module.parameters() if p.grad is not None]
            if grads and len(norms) == len(seen):
                norms.append(float(sum(g.double().pow(2).sum() for g in grads)) ** 0.5)

        def after_step(self, trainer, metrics):
            seen.append((metrics["loss"], norms[-1]))

    trainer.step_hooks.append(Spy())
    trainer.run()
    return seen


def test_spike_nan_and_grad_blowup_are_real(tmp_path, gloo_world):
    clean = _trace(_trainer(tmp_path, "clean", steps=3))
    spike = _trace(_trainer(tmp_path, "spike", {"spike_at_step": 1, "spike_factor": 50.0}, steps=3))
    assert spike[0][0] == clean[0][0]
    assert spike[1][0] == pytest.approx(50 * clean[1][0], rel=1e-5)  # the loss tensor was scaled
    assert spike[1][1] > 10 * clean[1][1]  # and so were its gradients
    blow = _trace(
        _trainer(tmp_path, "blow", {"grad_blowup_at_step": 1, "grad_factor": 1e3}, steps=3)
    )
    assert blow[1][0] == pytest.approx(clean[1][0], rel=1e-6)  # same loss value ...
    assert blow[1][1] > 100 * clean[1][1]  # ... a blown-up gradient
    nan = _trace(_trainer(tmp_path, "nan", {"nan_at_step": 2}, steps=3))
    assert math.isnan(nan[2][0]) and not math.isnan(nan[1][0])


def test_nan_gradients_divergence_and_corrupted_batches_are_real(tmp_path, gloo_world):
    clean = _trace(_trainer(tmp_path, "clean", steps=5))
    nan_grad = _trace(_trainer(tmp_path, "nan_grad", {"nan_grad_at_step": 1}, steps=3))
    assert nan_grad[1][0] == pytest.approx(clean[1][0], rel=1e-6)  # the loss stays finite
    assert math.isnan(nan_grad[1][1]) and not math.isnan(nan_grad[0][1])  # its gradient is NaN
    faults = {"diverge_at_step": 1, "diverge_steps": 2, "diverge_factor": 3.0}
    diverge = _trace(_trainer(tmp_path, "diverge", faults, steps=5))
    assert diverge[0][0] == clean[0][0]
    # the factor ramps 2, 3 then holds 3 (the weights drift apart, hence the tolerance)
    ratios = [diverge[k][0] / clean[k][0] for k in (1, 2, 3, 4)]
    assert ratios[0] == pytest.approx(2.0, rel=1e-5)
    assert ratios[1:] == pytest.approx([3.0] * 3, rel=0.05)
    corrupt = _trace(_trainer(tmp_path, "corrupt", {"corrupt_batch_at_step": 2}, steps=4))
    assert corrupt[1][0] == clean[1][0]
    assert abs(corrupt[2][0] - clean[2][0]) > 0.05  # other tokens, another loss


def test_kill_fires_once_across_a_restart(tmp_path, gloo_world):
    faults = {"kill_at_step": 3, "kill_mode": "raise"}
    with pytest.raises(RuntimeError, match="fault injection: killed at step 3"):
        _trainer(tmp_path, "run", faults, steps=6).run()
    assert (tmp_path / "run" / "faults" / "kill.fired").exists()
    resumed = _trainer(tmp_path, "run", faults, steps=6)  # same run dir: a restarted worker
    summary = resumed.run()
    assert summary["finished"] and summary["steps"] == 6
    assert resumed.events[0]["kind"] == "resume" and resumed.events[0]["from_step"] == 2


def test_kill_during_checkpoint_write_leaves_no_loadable_checkpoint(tmp_path, gloo_world):
    faults = {"kill_in_checkpoint_at_step": 4, "kill_mode": "raise"}
    with pytest.raises(CheckpointError, match="while writing checkpoint 4"):
        _trainer(tmp_path, "run", faults, steps=6).run()
    store = CheckpointStore(tmp_path / "run" / "checkpoints", keep=0)
    assert [i.step for i in store.list()] == [2]  # the half-written step 4 is invisible
    assert any(p.name.startswith(".tmp-") for p in store.root.iterdir())
    summary = _trainer(tmp_path, "run", faults, steps=6).run()
    assert summary["finished"] and summary["events"][0]["from_step"] == 2
    assert [i.step for i in store.list()] == [2, 4, 6]
