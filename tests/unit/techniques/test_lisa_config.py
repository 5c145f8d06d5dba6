"""LISA without an engine: its config is checked, the sampling is weighted and reproducible,
the optimizer state is counted and the plan shows the switches. The training runs (exactly
the sampled layers train, resume continues) are in
tests/integration/techniques/test_lisa_engine.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from orchestrator.errors import RecipeError
from orchestrator.recipe.expand import Variant
from orchestrator.recipe.plan import plan_of
from orchestrator.techniques.lisa import LisaConfig, optimizer_state_bytes, sample_layers

LAYERS = 4
MODEL = {"config": {"num_hidden_layers": LAYERS}}


def lisa_recipe(tmp_path: Path, zero: int = 0, steps: int = 8, every: int = 4, **lisa) -> object:
    """A tiny llama recipe with LISA on (gamma 2, interval 2 unless ``lisa`` says otherwise)."""
    return tiny_recipe(
        tmp_path,
        model=MODEL,
        schedule={"steps": steps},
        checkpoint={"every": every},
        techniques={"lisa": {"gamma": 2, "interval": 2, **lisa}},
        deepspeed={"zero_optimization": {"stage": zero}},
    )


def test_optimizer_state_bytes_counts_moments():
    p = torch.nn.Parameter(torch.ones(10))
    opt = torch.optim.AdamW([p], lr=0.1, foreach=False)
    assert optimizer_state_bytes(opt) == 0
    p.grad = torch.ones(10)
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 10 * 4 + 4  # exp_avg, exp_avg_sq, step


def _problems(tmp_path: Path, **kw) -> list:
    with pytest.raises(RecipeError) as info:
        lisa_recipe(tmp_path, **kw)
    return info.value.problems


def test_zero3_is_rejected_with_the_reason_and_the_fix(tmp_path):
    problems = _problems(tmp_path, zero=3)
    lisa = [p for p in problems if p.key == "techniques.lisa"]
    assert lisa and "ZeRO-3" in lisa[0].message and "stage 2" in lisa[0].message


def test_bad_gamma_interval_and_weights_are_rejected(tmp_path):
    assert any(p.key == "techniques.lisa.gamma" for p in _problems(tmp_path, gamma=LAYERS + 1))
    assert any(
        p.key.startswith("techniques.lisa.interval") for p in _problems(tmp_path, interval=0)
    )
    assert any(p.key == "techniques.lisa.weights" for p in _problems(tmp_path, weights=[1.0, 1.0]))
    with pytest.raises(ValueError):
        LisaConfig(gamma=0, train_embeddings=False, train_head=False, train_final_norm=False)


def test_weighted_sampling_only_picks_weighted_layers():
    cfg = LisaConfig(gamma=2, weights=[0.0, 1.0, 0.0, 3.0])
    assert all(sample_layers(cfg, 4, 0, i) == [1, 3] for i in range(10))
    uniform = LisaConfig(gamma=1)
    assert {sample_layers(uniform, 4, 0, i)[0] for i in range(40)} == {0, 1, 2, 3}
    assert sample_layers(uniform, 4, 7, 3) == sample_layers(uniform, 4, 7, 3)


def test_plan_shows_the_switches(tmp_path):
    recipe = lisa_recipe(tmp_path, steps=10)
    info = plan_of(Variant(name="v", assignments={}, recipe=recipe))["techniques"]["lisa"]
    assert info["switch_steps"] == [2, 4, 6, 8]
    cfg = LisaConfig(gamma=2, interval=2)
    assert info["active_from_step"][2] == sample_layers(cfg, LAYERS, 0, 1)


def _rewarm_lrs(interval: int, rewarm: int, steps: range) -> list[list[float]]:
    """The LR of [the always-on group, a layer group] on each step after a switch at 10."""
    from types import SimpleNamespace

    from orchestrator.techniques.lisa import Lisa

    lisa = Lisa(LisaConfig(gamma=1, interval=interval, rewarm_steps=rewarm), seed=0)
    groups = [{"lr": 1.0}, {"lr": 1.0}]
    lisa._ctx = SimpleNamespace(
        engine=SimpleNamespace(optimizer=SimpleNamespace(param_groups=groups))
    )  # type: ignore[assignment]
    lisa._n_always_groups, lisa._fresh_from = 1, 10
    out = []
    for step in steps:
        for g in groups:  # the loop sets the scheduled LR each step
            g["lr"] = 1.0
        lisa._rewarm(SimpleNamespace(step=step))  # type: ignore[arg-type]
        out.append([g["lr"] for g in groups])
    return out


def test_layers_switched_in_rewarm_their_lr_the_always_on_parts_do_not():
    """Fresh AdamW moments make the first update lr x sign(g) on every element of the new
    layers: at a high LR that spiked the loss 1.7x (bench/spike_guard, LISA every 5 steps)."""
    assert _rewarm_lrs(20, 3, range(10, 15)) == [
        [1.0, 0.25],
        [1.0, 0.5],
        [1.0, 0.75],
        [1.0, 1.0],
        [1.0, 1.0],
    ]
    assert _rewarm_lrs(2, 3, range(10, 12)) == [[1.0, 0.5], [1.0, 1.0]]  # at most interval - 1
    assert _rewarm_lrs(20, 0, range(10, 12)) == [[1.0, 1.0], [1.0, 1.0]]  # off


def test_the_rewarm_position_travels_with_the_checkpoint():
    from orchestrator.techniques.lisa import Lisa

    lisa = Lisa(LisaConfig(gamma=1, interval=5), seed=0)
    lisa.interval, lisa.active, lisa._fresh_from = 2, [1], 10
    resumed = Lisa(LisaConfig(gamma=1, interval=5), seed=0)
    resumed.load_state_dict(lisa.state_dict())
    assert resumed._fresh_from == 10
