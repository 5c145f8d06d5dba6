"""LR warmup, tested by the LR the optimizer actually used at chosen steps."""

from __future__ import annotations

import math

import pytest

from conftest import tiny_recipe
from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
from orchestrator.errors import RecipeError
from orchestrator.techniques.warmup import WarmupConfig, scheduled_lr


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("linear", 0, 0.25),  # warmup: (k + 1) / W
        ("linear", 3, 1.0),
        ("linear", 4, 1.0),  # decay starts at 1.0 ...
        ("linear", 14, 0.1 + 0.9 * (1 - 10 / 12)),
        ("cosine", 10, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 12))),
        ("constant", 15, 1.0),
        ("wsd", 11, 1.0),  # stable until the last 25% (steps 12-15)
        ("wsd", 15, 0.1 + 0.9 * (1 - 3 / 4)),
    ],
)
def test_formula(schedule, step, expected):
    cfg = WarmupConfig(schedule=schedule, warmup_steps=4, min_lr=0.1, decay_fraction=0.25)
    assert scheduled_lr(cfg, 1.0, step, 16) == pytest.approx(expected)


def test_warmup_fraction_resolves_against_total_steps():
    assert WarmupConfig(warmup_fraction=0.1).resolved_warmup(200) == 20


def test_optimizer_uses_scheduled_lr_each_step(tmp_path, gloo_world):
    recipe = tiny_recipe(
        tmp_path,
        schedule={"steps": 8},
        optimizer={"lr": 0.01},
        techniques={"warmup": {"schedule": "linear", "warmup_steps": 4, "min_lr": 0.001}},
    )
    seen: list[float] = []

    class Spy(StepHook):
        def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            seen.append(trainer.built.engine.optimizer.param_groups[0]["lr"])
            assert metrics["lr"] == seen[-1]  # what MLflow gets is what the step used

    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"), step_hooks=[Spy()])
    trainer.run()
    cfg = WarmupConfig(schedule="linear", warmup_steps=4, min_lr=0.001)
    assert seen == pytest.approx([scheduled_lr(cfg, 0.01, k, 8) for k in range(8)])
    assert seen[0] == pytest.approx(0.0025) and seen[3] == pytest.approx(0.01)


def test_warmup_longer_than_training_is_rejected(tmp_path):
    with pytest.raises(RecipeError, match="techniques.warmup.warmup_steps"):
        tiny_recipe(tmp_path, schedule={"steps": 5}, techniques={"warmup": {"warmup_steps": 5}})


def test_the_end_of_warmup_restarts_the_spike_guards_statistics(tmp_path):
    """Warmup marks a regime change at its last step + 1 only (loss and grad norm)."""
    from orchestrator.techniques.base import TrainState
    from orchestrator.techniques.warmup import Warmup

    warm = Warmup(WarmupConfig(warmup_fraction=0.25), peak_lr=1.0)
    state = TrainState(tiny_recipe(tmp_path), total_steps=16)
    marked = []
    for step in range(16):
        state._begin_step()
        state._update(step=step)
        warm.on_step_begin(state)
        if state.regime_change:
            marked.append((step, sorted(state.regime_signals)))
    assert marked == [(4, ["grad_norm", "loss"])]
