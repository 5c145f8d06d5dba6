"""Dropout schedules across LISA's engine rebuilds (``configure`` runs again each time).

The sites (``nn.Dropout`` modules, attention-dropout floats, HF config fields, drop-path
modules) and each drop-path site's share of the maximum are fixed at the first build, so
after every rebuild the rates follow the schedule on the same sites: also once the rate
reached 0 (a drop-path schedule used to crash there, re-deriving the shares from the
current, all-zero rates) and across a resume. The engine-free checks of the same logic
are in tests/unit/techniques/test_dropout.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from unit.techniques.test_dropout import EXPECTED, STEPS, R, _cfg, _vit_recipe, read_rates
from unit.techniques.test_lisa_config import MODEL

from conftest import tiny_recipe
from orchestrator.engine.loop import StepHook, Trainer, WorkerContext

pytestmark = pytest.mark.integration

PATH_RATE = 0.2
LISA = {"gamma": 2, "interval": 1}  # seed 0: the active layers change at most steps


class RateLog(StepHook):
    """The rates inside the model after each step, and the steps that rebuilt the engine."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, Any]] = {}
        self.rebuilt: list[int] = []

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.step - 1  # the step just run, with the rates it used
        self.seen[step] = read_rates(trainer.model)
        if "engine_rebuild_s" in metrics:
            self.rebuilt.append(step)


def _vit_lisa(tmp_path: Path, mode: str, schedule: str, **checkpoint: Any) -> Any:
    return _vit_recipe(
        tmp_path,
        schedule={"steps": STEPS},
        checkpoint={"every": 0, **checkpoint},
        techniques={
            "dropout": _cfg(mode, schedule, target="both", drop_path_rate=PATH_RATE),
            "lisa": {**LISA, "layers_path": "blocks"},
        },
    )


def _run(recipe: Any, run_dir: Path, **ctx: Any) -> tuple[Trainer, RateLog]:
    log = RateLog()
    trainer = Trainer(recipe, WorkerContext(run_dir=run_dir, **ctx), step_hooks=[log])
    trainer.run()
    return trainer, log


def _assert_rebuilt_at_rate_zero(rates: list[float], log: RateLog) -> None:
    """The run really rebuilt the engine while the model held rate 0 (the crash case)."""
    # dropout's on_step_begin runs before LISA's: a rebuild at step k sees step k's rates
    assert any(rates[k] == 0.0 for k in log.rebuilt), (rates, log.rebuilt)


@pytest.mark.parametrize(("mode", "schedule"), [m for m in EXPECTED if m[0] != "standard"])
def test_drop_path_profile_survives_lisa_rebuilds(mode, schedule, tmp_path, gloo_world):
    rates = EXPECTED[(mode, schedule)]
    trainer, log = _run(_vit_lisa(tmp_path, mode, schedule), tmp_path / "run")
    assert trainer.state.step == STEPS and sorted(log.seen) == list(range(STEPS))
    _assert_rebuilt_at_rate_zero(rates, log)
    for step, rate in enumerate(rates):
        seen = log.seen[step]
        assert seen["dropout"] == [pytest.approx(rate, abs=1e-6)], (step, seen)
        path = rate / R * PATH_RATE
        # three blocks, two DropPaths each, linear in depth: shares 0, 1/2, 1 of the build
        want = [0.0, 0.0, path / 2, path / 2, path, path]
        assert seen["drop_path"] == pytest.approx(want, abs=1e-6), (step, seen)
    if mode == "late":  # the profile comes back after rebuilds that ran at rate 0
        first_zero = min(k for k in log.rebuilt if rates[k] == 0.0)
        assert any(rates[k] > 0 for k in range(first_zero + 1, STEPS))


def test_attention_floats_and_config_follow_the_schedule_across_rebuilds(tmp_path, gloo_world):
    rates = EXPECTED[("late", "constant")]
    recipe = tiny_recipe(
        tmp_path,
        model=MODEL,
        schedule={"steps": STEPS},
        checkpoint={"every": 0},
        techniques={"dropout": _cfg("late", "constant"), "lisa": LISA},
    )
    trainer, log = _run(recipe, tmp_path / "run")
    assert trainer.state.step == STEPS
    _assert_rebuilt_at_rate_zero(rates, log)
    assert any(rates[k] > 0 for k in log.rebuilt)
    for step, rate in enumerate(rates):
        seen = log.seen[step]
        assert seen["attn_float"] == [pytest.approx(rate, abs=1e-6)], (step, seen)
        assert seen["config"] == pytest.approx(rate, abs=1e-6), (step, seen)


def test_resume_after_rate_zero_rebuilds_is_bit_for_bit(tmp_path, gloo_world):
    recipe = _vit_lisa(tmp_path, "late", "linear", every=4)
    straight, straight_log = _run(recipe, tmp_path / "straight")
    _run(recipe, tmp_path / "split", stop_after_steps=4)
    resumed, resumed_log = _run(recipe, tmp_path / "split")
    assert resumed.events[0]["kind"] == "resume" and resumed.events[0]["from_step"] == 4
    assert sorted(resumed_log.seen) == list(range(4, STEPS))
    for step in range(4, STEPS):
        assert resumed_log.seen[step] == straight_log.seen[step], step
    assert straight_log.seen[STEPS - 1]["drop_path"][-1] > 0  # the resumed part schedules > 0
    a = straight.built.engine.module.state_dict()
    b = resumed.built.engine.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
