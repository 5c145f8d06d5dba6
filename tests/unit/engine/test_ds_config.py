"""DeepSpeed config: derived keys win, native keys pass through, contradictions are errors."""

from __future__ import annotations

from conftest import tiny_recipe
from orchestrator.engine.ds_config import build_ds_config, ds_config_problems


def test_native_keys_pass_through_and_derived_keys_are_set(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        deepspeed={"zero_optimization": {"stage": 2, "overlap_comm": False}},
        schedule={"micro_batch_size": 4, "grad_accumulation": 3},
        resources={"workers": 2},
    )
    config = build_ds_config(recipe)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 24


def test_agreeing_native_keys_are_fine(tmp_path):
    recipe = tiny_recipe(tmp_path, deepspeed={"train_micro_batch_size_per_gpu": 4})
    assert ds_config_problems(recipe) == []


def test_contradictions_and_owned_blocks_are_reported(tmp_path):
    import pytest

    from orchestrator.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        tiny_recipe(
            tmp_path,
            deepspeed={
                "train_micro_batch_size_per_gpu": 16,
                "optimizer": {"type": "Adam"},
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": 3},
            },
        )
    keys = {p.key for p in info.value.problems}
    assert keys == {
        "deepspeed.train_micro_batch_size_per_gpu",
        "deepspeed.optimizer",
        "deepspeed.bf16.enabled",
        "deepspeed.zero_optimization.stage",
    }
    assert all("recipe" in p.message or "use" in p.message for p in info.value.problems)
