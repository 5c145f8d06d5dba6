"""HF Trainer / Axolotl-style DeepSpeed configs train as they are.

The recipes in recipes/ paste such a config (`"auto"` values, an optimizer block of
autos): ZeRO-2 by path (`deepspeed: ds/zero2_auto.json`), ZeRO-1 inline and by path. Each
trains a few steps of the tiny model through the in-process Trainer, and the DeepSpeed
engine runs with the values the recipe says, not DeepSpeed's defaults for a missing key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.recipe.loader import load_recipe

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.integration  # runs DeepSpeed

CASES = {
    # recipe, overrides, (ZeRO stage, micro batch, accumulation, clipping)
    "zero2-by-path": ("hf_style_zero2.yaml", [], (2, 4, 2, 0.5)),
    "zero1-inline": ("hf_style_zero1.yaml", [], (1, 4, 1, 1.0)),
    "zero1-by-path": (
        "hf_style_zero1.yaml",
        ["deepspeed=recipes/ds/zero1_auto.json", "schedule.grad_accumulation=2"],
        (1, 4, 2, 1.0),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_style_config_trains_with_resolved_values(
    case: str, tmp_path: Path, gloo_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, overrides, (stage, micro, accumulation, clipping) = CASES[case]
    monkeypatch.chdir(REPO)
    overrides = [*overrides, f"checkpoint.storage={tmp_path / 'runs'}", "schedule.steps=3"]
    recipe = load_recipe(REPO / "recipes" / name, overrides).recipe
    assert "auto" in repr(recipe.deepspeed)  # the config as pasted
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"))
    trainer.run()
    engine = trainer.built.engine
    assert engine.global_steps == 3
    assert engine.zero_optimization_stage() == stage
    assert engine.train_micro_batch_size_per_gpu() == micro
    assert engine.gradient_accumulation_steps() == accumulation
    assert engine.train_batch_size() == micro * accumulation
    assert engine.gradient_clipping() == clipping
    assert not engine.bfloat16_enabled() and not engine.fp16_enabled()
    assert engine._config.zero_config.reduce_bucket_size == 500_000_000  # "auto": the default
    lrs = {group["lr"] for group in trainer.built.optimizer.param_groups}
    assert max(lrs) <= recipe.optimizer.lr  # Regimen's optimizer, Regimen's LR
