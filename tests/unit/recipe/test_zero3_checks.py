"""ZeRO-3 at validation: the techniques that work under it validate, the ones that cannot
are refused with the reason and the fix."""

from __future__ import annotations

import pytest

from conftest import tiny_recipe
from orchestrator.errors import RecipeError

ZERO3 = {"zero_optimization": {"stage": 3}}


def test_zero3_validates_with_warmup_dropout_spike_guard_and_sgg(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        deepspeed=ZERO3,
        stability={"min_history": 4},
        techniques={
            "warmup": {"warmup_steps": 2},
            "dropout": {"rate": 0.1, "cutoff_steps": 4},
            "sgg": {"recluster_interval": 2},
        },
    )
    assert recipe.zero_stage == 3


def test_zero3_refuses_the_leading_indicators_with_the_fix(tmp_path):
    with pytest.raises(RecipeError) as info:
        tiny_recipe(tmp_path, deepspeed=ZERO3, stability={"indicators_every": 2})
    (problem,) = info.value.problems
    assert problem.key == "stability.indicators_every"
    assert "ZeRO-3" in problem.message and "indicators_every: 0" in problem.message
