"""LISA's layer draw: a pure function of (seed, interval), without torch, following the weights."""

from __future__ import annotations

import subprocess
import sys

from orchestrator.recipe.techniques.lisa import LisaConfig, sample_layers


def test_weighted_draws_follow_the_weights() -> None:
    cfg = LisaConfig(gamma=1, weights=[1.0, 9.0])
    picks = [sample_layers(cfg, 2, 0, i)[0] for i in range(4000)]
    assert 0.87 < picks.count(1) / len(picks) < 0.93


def test_uniform_draws_are_distinct_sorted_and_spread() -> None:
    cfg = LisaConfig(gamma=3)
    draws = [sample_layers(cfg, 8, 5, i) for i in range(800)]
    assert all(d == sorted(set(d)) and len(d) == 3 for d in draws)
    counts = [sum(layer in d for d in draws) for layer in range(8)]
    assert min(counts) > 0.7 * 800 * 3 / 8  # each layer about 3/8 of the time


def test_planning_a_lisa_recipe_needs_no_torch() -> None:
    code = (
        "import sys; from orchestrator.recipe.techniques.lisa import LisaConfig, sample_layers;"
        "sample_layers(LisaConfig(gamma=2), 6, 0, 3);"
        "sample_layers(LisaConfig(gamma=1, weights=[1.0, 2.0]), 2, 0, 3);"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
