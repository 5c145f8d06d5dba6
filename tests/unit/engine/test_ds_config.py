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
                "zero_optimization": {"stage": 4},
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


HF_STYLE = {
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": False},
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto"}},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "steps_per_print": 2000,
}


def test_auto_values_resolve_to_what_the_recipe_says(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        deepspeed=HF_STYLE,
        schedule={"micro_batch_size": 4, "grad_accumulation": 3},
        optimizer={"grad_clip": 0.25},
        precision="bf16",
        resources={"workers": 2},
    )
    config = build_ds_config(recipe)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 24
    assert config["gradient_clipping"] == 0.25
    assert config["bf16"] == {"enabled": True}
    assert config["fp16"] == {"enabled": False, "loss_scale": 0}
    assert config["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # DeepSpeed's
    assert config["steps_per_print"] == 2000  # a logging key: the native value stays
    assert "optimizer" not in config  # checked to agree; Regimen builds the optimizer
    assert "auto" not in repr(config)


def test_optimizer_block_that_agrees_is_accepted_and_one_that_disagrees_names_both(tmp_path):
    import pytest

    from orchestrator.errors import RecipeError

    agreeing = {"type": "adamw", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": "auto"}}
    tiny_recipe(tmp_path, deepspeed={"optimizer": agreeing}, optimizer={"lr": 3e-3})
    with pytest.raises(RecipeError) as info:
        tiny_recipe(
            tmp_path,
            deepspeed={"optimizer": {"params": {"lr": 1e-2, "betas": [0.9, 0.999]}}},
            optimizer={"lr": 3e-3},
        )
    by_key = {p.key: p.message for p in info.value.problems}
    assert set(by_key) == {"deepspeed.optimizer.params.lr", "deepspeed.optimizer.params.betas"}
    assert "0.01" in by_key["deepspeed.optimizer.params.lr"]
    assert "0.003" in by_key["deepspeed.optimizer.params.lr"]
    assert '"auto"' in by_key["deepspeed.optimizer.params.lr"]


def test_every_level_is_checked(tmp_path):
    import pytest

    from orchestrator.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        tiny_recipe(
            tmp_path,
            deepspeed={
                "zreo_optimization": {"stage": 2},
                "zero_optimization": {"offload_param": {"devise": "cpu"}},
                "fp16": {"enabeld": True},
                "optimizer": {"params": {"learning_rate": 1e-3}},
                "steps_per_print": "auto",
            },
        )
    by_key = {p.key: p.message for p in info.value.problems}
    assert "did you mean 'zero_optimization'" in by_key["deepspeed.zreo_optimization"]
    assert "did you mean 'device'" in by_key["deepspeed.zero_optimization.offload_param.devise"]
    assert "did you mean 'enabled'" in by_key["deepspeed.fp16.enabeld"]
    assert "deepspeed.optimizer.params.learning_rate" in by_key
    assert "not accepted here" in by_key["deepspeed.steps_per_print"]
