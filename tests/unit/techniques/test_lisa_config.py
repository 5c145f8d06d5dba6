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
